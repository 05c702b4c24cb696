//! The cost of the layer chain per filter depth: a 4 KiB read through N pass-through filters
//! (each with its validating shim) over a RAM-like backend that completes at once.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::layer::registry::{BackendFactory, FilterFactory};
use blocksmith_core::layer::{Done, ExportInfo, Filter, FilterLayer, Flags, Layer, Next, OpenCx, Stack};
use blocksmith_core::sched::SimScheduler;
use blocksmith_core::NbdError;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

struct Zeroes;

impl Layer for Zeroes {
    fn info(&self) -> ExportInfo {
        ExportInfo::read_only(1 << 30)
    }
    fn pread(&self, buf: Vec<u8>, _offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        done.ok(buf)
    }
}

struct ZeroesFactory;

impl BackendFactory for ZeroesFactory {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(Zeroes))
    }
}

/// A filter that implements nothing: every call takes the default pass-through.
struct PassThrough;
impl Filter for PassThrough {}

struct PassThroughFactory;

impl FilterFactory for PassThroughFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        Ok(Rc::new(FilterLayer { filter: PassThrough, next }))
    }
}

fn chain(c: &mut Criterion) {
    let mut g = c.benchmark_group("layer_chain_read_4k");
    for depth in [0usize, 1, 5, 10] {
        let sim = SimScheduler::new();
        let filters: Vec<(String, Arc<dyn FilterFactory>)> = (0..depth)
            .map(|_| ("pass".to_string(), Arc::new(PassThroughFactory) as Arc<dyn FilterFactory>))
            .collect();
        let stack = Stack::new(("zeroes".into(), Arc::new(ZeroesFactory)), filters);
        let opened: Rc<RefCell<Option<Rc<dyn Layer>>>> = Rc::new(RefCell::new(None));
        let o = opened.clone();
        stack.open(&OpenCx::for_tests(sim.sched()), Done::new(move |r| *o.borrow_mut() = r.ok()));
        let top = opened.borrow_mut().take().expect("stack opens synchronously");
        let spare: Rc<RefCell<Option<Vec<u8>>>> = Rc::new(RefCell::new(Some(vec![0u8; 4096])));
        g.bench_with_input(BenchmarkId::from_parameter(depth), &depth, |b, _| {
            b.iter(|| {
                let buf = spare.borrow_mut().take().unwrap_or_else(|| vec![0u8; 4096]);
                let s = spare.clone();
                top.pread(buf, 4096, Flags::NONE, Done::new(move |r| *s.borrow_mut() = r.ok()));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
