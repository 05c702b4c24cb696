//! The limit filter (nbdkit-limit-filter): limit how many clients may have the export open at
//! once (`limit=N`, default 1; 0 means no limit).
//!
//! Counted when a client opens the export and released when it closes. A client that
//! connects while the limit is reached is closed at once (the server's preconnect hook), as
//! nbdkit does; one that gets in while another is still negotiating fails to open the export
//! (NBD_OPT_GO or NBD_OPT_INFO fail with a policy error). An NBD_OPT_INFO counts while it is
//! answered.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec, ReadData,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "limit",
    summary: "limit the number of clients connected at once",
    params: &[ParamSpec { name: "limit", help: "Most clients at once (default 1; 0: no limit)." }],
    make,
};

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let limit = match p.take("limit") {
        None => 1,
        Some(v) => v.trim().parse::<usize>().map_err(|_| {
            ConfigError::new(format!("limit: limit: expected a number of clients, got '{v}'"))
        })?,
    };
    Ok(Arc::new(LimitFactory { limit, open: Arc::new(AtomicUsize::new(0)) }))
}

struct LimitFactory {
    limit: usize,
    open: Arc<AtomicUsize>,
}

impl FilterFactory for LimitFactory {
    fn preconnect(&self, peer: &blocksmith_core::layer::Peer) -> Result<(), NbdError> {
        if self.limit > 0 && self.open.load(Ordering::SeqCst) >= self.limit {
            ::log::info!("limit: client {} rejected at connect", peer.addr);
            return Err(NbdError::msg(
                Errno::Perm,
                format!("limit: too many clients connected (limit={})", self.limit),
            ));
        }
        Ok(())
    }

    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        if self.limit == 0 {
            return Ok(next);
        }
        // Counted first, then checked: two clients opening at once on two loops cannot both
        // slip under the limit.
        let before = self.open.fetch_add(1, Ordering::SeqCst);
        if before >= self.limit {
            self.open.fetch_sub(1, Ordering::SeqCst);
            ::log::info!("limit: client {} (connection {}) rejected", cx.peer, cx.conn_id);
            return Err(NbdError::msg(
                Errno::Perm,
                format!("limit: too many clients connected (limit={}), connection rejected", self.limit),
            ));
        }
        let counted = Counted { count: self.open.clone(), held: Cell::new(true) };
        Ok(Rc::new(FilterLayer { filter: LimitFilter(counted), next }))
    }
}

/// One unit of a shared count, given back exactly once: at close, or when dropped if the
/// connection never got as far as closing.
pub(crate) struct Counted {
    pub(crate) count: Arc<AtomicUsize>,
    pub(crate) held: Cell<bool>,
}

impl Counted {
    /// Give the unit back; returns the count left, or `None` if it was given back already.
    pub(crate) fn release(&self) -> Option<usize> {
        if self.held.replace(false) {
            Some(self.count.fetch_sub(1, Ordering::SeqCst) - 1)
        } else {
            None
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.release();
    }
}

struct LimitFilter(Counted);

impl Filter for LimitFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn close(&self, next: &Next) {
        self.0.release();
        next.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, Ram};
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn second_client_is_refused_until_the_first_closes() {
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[]);
        let a = f.open(&cx(&sim), Ram::new(4096)).unwrap();
        let e = f.open(&cx(&sim), Ram::new(4096)).err().unwrap();
        assert_eq!(e.errno, Errno::Perm);
        assert!(e.message.unwrap().contains("too many clients"));
        a.close();
        a.close(); // closing twice gives back one unit only
        let b = f.open(&cx(&sim), Ram::new(4096)).unwrap();
        assert!(f.open(&cx(&sim), Ram::new(4096)).is_err());
        drop(b); // dropped without close (a filter above failed to open): given back too
        assert!(f.open(&cx(&sim), Ram::new(4096)).is_ok());
    }

    #[test]
    fn zero_means_unlimited_and_bad_values_fail() {
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[("limit", "0")]);
        let _held: Vec<_> = (0..10).map(|_| f.open(&cx(&sim), Ram::new(4096)).unwrap()).collect();
        let f = configure(&SPEC, &[("limit", "3")]);
        let _held: Vec<_> = (0..3).map(|_| f.open(&cx(&sim), Ram::new(4096)).unwrap()).collect();
        assert!(f.open(&cx(&sim), Ram::new(4096)).is_err());
        assert!(make_err(&SPEC, &[("limit", "-1")]).contains("expected a number"));
    }
}
