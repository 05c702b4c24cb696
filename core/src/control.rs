//! Server-wide state that layers may see and act on: shutting the server down (`exitlast`,
//! `exitwhen`, `time-limit`) and how many clients are connected (`limit`, `exitlast`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::Waker;

/// Shared by every loop and every layer. Triggering shutdown wakes every loop: they stop
/// accepting, let requests in flight finish (up to a grace period), then exit.
#[derive(Default)]
pub struct ServerControl {
    shutdown: AtomicBool,
    connections: AtomicUsize,
    wakers: Mutex<Vec<Arc<Waker>>>,
}

impl ServerControl {
    pub fn new() -> Arc<ServerControl> {
        Arc::new(ServerControl::default())
    }

    /// Ask the server to shut down cleanly. Safe from any thread.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Ok(w) = self.wakers.lock() {
            for w in w.iter() {
                let _ = w.wake();
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Clients connected right now (accepted and not yet closed).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn connection_closed(&self) {
        let prev = self.connections.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(prev > 0, "connection count underflow");
    }

    pub(crate) fn add_waker(&self, w: Arc<Waker>) {
        if let Ok(mut ws) = self.wakers.lock() {
            ws.push(w.clone());
        }
        // A shutdown that raced with registration must still reach this loop.
        if self.is_shutting_down() {
            let _ = w.wake();
        }
    }
}

/// Something to run when the operator asks for a report (SIGUSR1): the stats filter writes its
/// file. Runs on the signal thread, never on an event loop, so it may block briefly.
pub type ReportHook = Box<dyn Fn() + Send + Sync>;

static REPORT_HOOKS: Mutex<Vec<ReportHook>> = Mutex::new(Vec::new());

/// Register a hook for [`report_now`]. Hooks live as long as the process.
pub fn on_report(hook: ReportHook) {
    if let Ok(mut h) = REPORT_HOOKS.lock() {
        h.push(hook);
    }
}

/// Run every report hook (the server got SIGUSR1).
pub fn report_now() {
    if let Ok(h) = REPORT_HOOKS.lock() {
        for hook in h.iter() {
            hook();
        }
    }
}
