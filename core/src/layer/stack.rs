//! A configured stack: filters (nearest the client first) over one backend. Opening it for a
//! connection opens the backend, then each filter from the bottom up, with a [`Shim`] above
//! every layer.

use std::rc::Rc;
use std::sync::Arc;

use super::registry::{BackendFactory, ExportDesc, FilterFactory};
use super::shim::Shim;
use super::{Done, Layer, OpenCx, Peer};
use crate::error::NbdError;

#[derive(Clone)]
pub struct Stack {
    /// Filters in command-line order: `filters[0]` is nearest the client.
    pub filters: Vec<(String, Arc<dyn FilterFactory>)>,
    pub backend: (String, Arc<dyn BackendFactory>),
}

impl Stack {
    pub fn new(
        backend: (String, Arc<dyn BackendFactory>),
        filters: Vec<(String, Arc<dyn FilterFactory>)>,
    ) -> Self {
        Stack { filters, backend }
    }

    /// Open the whole stack for one connection. `done` gets the top shim, the layer the
    /// connection talks to; `cx.readonly` (the server's `-r`) is enforced there.
    pub fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        // Each layer is opened with the export name the filter above it chose (top-down), so
        // keep the context each filter saw.
        let mut contexts = Vec::with_capacity(self.filters.len());
        let mut below = cx.clone();
        for (_, f) in &self.filters {
            let name = match f.export_name(&below, &below.export_name) {
                Ok(n) => n,
                Err(e) => return done.err(e),
            };
            contexts.push(below.clone());
            below.export_name = name;
        }
        let filters = self.filters.clone();
        let readonly = cx.readonly;
        self.backend.1.open(
            &below,
            Done::new(move |r: Result<Rc<dyn Layer>, NbdError>| match r {
                Err(e) => done.err(e),
                Ok(backend) => {
                    // A shim above every layer; the topmost also applies the server's `-r`.
                    let layer = Shim::new(backend, filters.is_empty() && readonly);
                    open_filters(Rc::new(Opening { filters, contexts, readonly }), layer, done)
                }
            }),
        )
    }

    /// The export list as `peer` sees it, after every filter has had its say.
    pub fn list_exports(&self, peer: &Peer) -> Vec<ExportDesc> {
        let mut list = self.backend.1.list_exports();
        for (_, f) in self.filters.iter().rev() {
            list = f.list_exports_for(peer, list);
        }
        list
    }

    /// Ask every layer, nearest the client first, whether to accept a new client.
    pub fn preconnect(&self, peer: &Peer) -> Result<(), NbdError> {
        for (_, f) in &self.filters {
            f.preconnect(peer)?;
        }
        self.backend.1.preconnect(peer)
    }
}

/// What is left to open once the backend is open.
struct Opening {
    filters: Vec<(String, Arc<dyn FilterFactory>)>,
    /// The context each filter was asked to open with (its export name may differ).
    contexts: Vec<OpenCx>,
    readonly: bool,
}

/// Open the filters from the bottom up over `layer`, each possibly completing later.
fn open_filters(o: Rc<Opening>, layer: Rc<dyn Layer>, done: Done<Rc<dyn Layer>>) {
    // Filters still to open are `o.filters[..remaining]`; the last of them sits just above
    // `layer`.
    fn step(o: Rc<Opening>, remaining: usize, layer: Rc<dyn Layer>, done: Done<Rc<dyn Layer>>) {
        if remaining == 0 {
            return done.ok(layer);
        }
        let depth = remaining - 1;
        let (f, fcx) = (&o.filters[depth].1, &o.contexts[depth]);
        let below = layer.clone();
        let next = o.clone();
        f.open_async(
            fcx,
            layer,
            Done::new(move |r: Result<Rc<dyn Layer>, NbdError>| match r {
                Ok(l) => {
                    let top = depth == 0 && next.readonly;
                    step(next, depth, Shim::new(l, top), done)
                }
                Err(e) => {
                    // What is already open below must hear that it is closed.
                    below.close();
                    done.err(e)
                }
            }),
        );
    }
    let n = o.filters.len();
    step(o, n, layer, done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{ExportInfo, Filter, FilterLayer, Flags, Next};
    use crate::sched::SimScheduler;
    use std::cell::RefCell;

    struct Disk;
    impl Layer for Disk {
        fn info(&self) -> ExportInfo {
            ExportInfo::read_only(1 << 20)
        }
        fn pread(&self, mut buf: Vec<u8>, offset: u64, _f: Flags, done: Done<Vec<u8>>) {
            buf.fill((offset >> 12) as u8);
            done.ok(buf)
        }
    }
    struct DiskFactory;
    impl BackendFactory for DiskFactory {
        fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
            done.ok(Rc::new(Disk))
        }
    }

    /// A filter that reads from below before it is ready, like `partition`, and then serves
    /// from the offset it read.
    struct Probe(u64);
    impl Filter for Probe {
        fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, f: Flags, done: Done<Vec<u8>>) {
            next.pread(buf, offset + self.0, f, done)
        }
    }
    struct ProbeFactory(Option<NbdError>);
    impl FilterFactory for ProbeFactory {
        fn open(&self, _cx: &OpenCx, _next: Next) -> Result<Rc<dyn Layer>, NbdError> {
            Err(NbdError::inval("only open_async"))
        }
        fn open_async(&self, cx: &OpenCx, next: Next, done: Done<Rc<dyn Layer>>) {
            let fail = self.0.clone();
            let sched = cx.sched.clone();
            let n = next.clone();
            next.pread(
                vec![0; 1],
                8192,
                Flags::NONE,
                Done::new(move |r: Result<Vec<u8>, NbdError>| {
                    // Complete later, on the scheduler, as a filter waiting on IO would.
                    sched.defer(move || match (fail, r) {
                        (Some(e), _) => done.err(e),
                        (None, Ok(b)) => {
                            done.ok(Rc::new(FilterLayer { filter: Probe(u64::from(b[0]) << 12), next: n }))
                        }
                        (None, Err(e)) => done.err(e),
                    })
                }),
            );
        }
    }

    #[test]
    fn filters_may_open_asynchronously() {
        let sim = SimScheduler::new();
        let stack = Stack::new(
            ("disk".into(), Arc::new(DiskFactory)),
            vec![("probe".into(), Arc::new(ProbeFactory(None)) as Arc<dyn FilterFactory>)],
        );
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        stack.open(&OpenCx::for_tests(sim.sched()), Done::new(move |r| *g.borrow_mut() = Some(r)));
        assert!(got.borrow().is_none(), "the filter has not finished opening yet");
        sim.run_until_idle();
        let top = got.borrow_mut().take().unwrap().unwrap();
        // The probe read block 2's marker (2), so it serves from 2 blocks further on.
        let out = Rc::new(RefCell::new(None));
        let o = out.clone();
        top.pread(vec![0; 4], 4096, Flags::NONE, Done::new(move |r| *o.borrow_mut() = Some(r)));
        assert_eq!(out.borrow_mut().take().unwrap().unwrap(), vec![3; 4]);

        let failing = Stack::new(
            ("disk".into(), Arc::new(DiskFactory)),
            vec![(
                "probe".into(),
                Arc::new(ProbeFactory(Some(NbdError::io("no table")))) as Arc<dyn FilterFactory>,
            )],
        );
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        failing.open(&OpenCx::for_tests(sim.sched()), Done::new(move |r| *g.borrow_mut() = Some(r)));
        sim.run_until_idle();
        assert_eq!(
            got.borrow_mut().take().unwrap().err().map(|e| e.to_string()),
            Some("EIO: no table".into())
        );
    }
}
