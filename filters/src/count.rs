//! The count filter (nbdkit-count-filter, nbdkit 1.46): count the bytes read, written, zeroed
//! and trimmed by successful requests, and log the totals when the server exits, as nbdkit does
//! with a debug message (so, as there, they are shown with `-v`):
//!
//! ```text
//! blocksmith: debug: count bytes: read 1048576, written 65536, zeroed 0, trimmed 4096
//! ```

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "count",
    summary: "count bytes read, written, zeroed and trimmed; log them at exit (-v)",
    params: &[],
    make,
};

fn make(_p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    Ok(Arc::new(CountFactory(Arc::new(Counters::default()))))
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    trimmed: AtomicU64,
}

impl Counters {
    fn summary(&self) -> String {
        format!(
            "count bytes: read {}, written {}, zeroed {}, trimmed {}",
            self.read.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
            self.zeroed.load(Ordering::Relaxed),
            self.trimmed.load(Ordering::Relaxed)
        )
    }
}

struct CountFactory(Arc<Counters>);

impl Drop for CountFactory {
    /// Every stack is gone: the server is exiting.
    fn drop(&mut self) {
        ::log::debug!("{}", self.0.summary());
    }
}

impl FilterFactory for CountFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        Ok(Rc::new(FilterLayer { filter: CountFilter(self.0.clone()), next }))
    }
}

struct CountFilter(Arc<Counters>);

/// Add `n` to `counter` if the request succeeds.
fn counted<T: 'static>(
    counters: &Arc<Counters>,
    pick: fn(&Counters) -> &AtomicU64,
    n: u64,
    done: Done<T>,
) -> Done<T> {
    let c = counters.clone();
    Done::new(move |r: Result<T, NbdError>| {
        if r.is_ok() {
            pick(&c).fetch_add(n, Ordering::Relaxed);
        }
        done.call(r)
    })
}

impl Filter for CountFilter {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let done = counted(&self.0, |c| &c.read, buf.len() as u64, done);
        next.pread(buf, offset, flags, done)
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let done = counted(&self.0, |c| &c.written, data.len() as u64, done);
        next.pwrite(data, offset, flags, done)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.zero(count, offset, flags, counted(&self.0, |c| &c.zeroed, count, done))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.trim(count, offset, flags, counted(&self.0, |c| &c.trimmed, count, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn successful_requests_are_counted() {
        let sim = SimScheduler::new();
        let counters = Arc::new(Counters::default());
        let f: Arc<dyn FilterFactory> = Arc::new(CountFactory(counters.clone()));
        let top = open(&f, &cx(&sim), Ram::with(65536, |r| r.fail_at = Some(60000))).unwrap();
        wait(&sim, |d| top.pread(vec![0; 1000], 0, Flags::NONE, d)).unwrap();
        assert!(wait(&sim, |d| top.pread(vec![0; 1000], 59500, Flags::NONE, d)).is_err());
        wait(&sim, |d| top.pwrite(vec![1; 300], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.zero(4096, 4096, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.trim(512, 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(counters.summary(), "count bytes: read 1000, written 300, zeroed 4096, trimmed 512");
    }
}
