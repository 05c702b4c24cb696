//! The upstream connections of one configured `nbd` backend on one event loop.
//!
//! Layers live on one loop (`Rc`), so each loop thread keeps its own pool, found through a
//! thread-local map keyed by the backend's id. The pool caps how many upstream connections the
//! loop opens (`max-upstream`, or `connections` with `shared=true`): below the cap a new client
//! gets a connection of its own, at the cap it shares the least used one. Sharing is always
//! safe — NBD requests are independent and carry their own cookies — it only means a FLUSH from
//! one client also covers another's writes, which promises nothing the client can observe.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use blocksmith_core::budget::Budget;
use blocksmith_core::sched::Sched;

use super::lane::Lane;
use super::Config;

thread_local! {
    static POOLS: RefCell<HashMap<u64, Rc<Pool>>> = RefCell::new(HashMap::new());
}

pub struct Pool {
    cfg: Arc<Config>,
    sched: Sched,
    budget: Budget,
    me: Weak<Pool>,
    lanes: RefCell<Vec<Rc<Lane>>>,
    next_lane: Cell<u64>,
}

/// This loop's pool for `cfg`. A pool belongs to one scheduler: a test that runs a second loop
/// on the same thread gets a fresh one.
pub fn pool_for(cfg: &Arc<Config>, sched: &Sched, budget: &Budget) -> Rc<Pool> {
    POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        if let Some(p) = pools.get(&cfg.id) {
            if Rc::ptr_eq(&p.sched.0, &sched.0) {
                return p.clone();
            }
        }
        let p = Rc::new_cyclic(|me| Pool {
            cfg: cfg.clone(),
            sched: sched.clone(),
            budget: budget.clone(),
            me: me.clone(),
            lanes: RefCell::new(Vec::new()),
            next_lane: Cell::new(1),
        });
        pools.insert(cfg.id, p.clone());
        p
    })
}

impl Pool {
    /// Most upstream connections this loop may hold.
    pub fn cap(&self) -> usize {
        if self.cfg.shared {
            self.cfg.connections
        } else {
            self.cfg.max_upstream
        }
    }

    /// Upstream connections this loop holds now (connected or not).
    pub fn lane_count(&self) -> usize {
        self.lanes.borrow().len()
    }

    /// A lane for a client, other than those in `exclude`: a new one below the cap, else the
    /// one with the fewest clients (ready ones first). `None` if every lane is excluded.
    pub fn acquire(&self, exclude: &[Rc<Lane>]) -> Option<Rc<Lane>> {
        if self.lane_count() < self.cap() {
            return Some(self.new_lane());
        }
        let lanes = self.lanes.borrow();
        lanes
            .iter()
            .filter(|l| !exclude.iter().any(|e| Rc::ptr_eq(e, l)))
            .min_by_key(|l| (!l.is_ready(), l.users(), l.in_flight()))
            .cloned()
    }

    fn new_lane(&self) -> Rc<Lane> {
        let id = self.next_lane.get();
        self.next_lane.set(id + 1);
        let pool = self.me.clone();
        let lane = Lane::new(
            id,
            self.cfg.clone(),
            self.sched.clone(),
            self.budget.clone(),
            Box::new(move |id| {
                if let Some(p) = pool.upgrade() {
                    p.lanes.borrow_mut().retain(|l| l.id != id);
                }
            }),
        );
        self.lanes.borrow_mut().push(lane.clone());
        lane
    }
}

impl Drop for Pool {
    /// The loop's thread is exiting (its thread-local map goes) or a test dropped its loop:
    /// close every connection, which drops the callbacks the loop holds and with them the
    /// lanes' references to the configuration (for `command=`, what kills the server we ran).
    fn drop(&mut self) {
        let lanes = std::mem::take(&mut *self.lanes.borrow_mut());
        for l in lanes {
            l.shut_down();
        }
    }
}
