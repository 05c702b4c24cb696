//! The time-limit filter (nbdkit-time-limit-filter, nbdkit 1.42): limit how long each client may
//! stay connected (`time-limit=`, default 60 seconds, from when it opens the export).
//!
//! At the limit the client is disconnected, as nbdkit does: requests in flight are answered,
//! then the connection is closed. A request that slips in meanwhile fails with ESHUTDOWN.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocksmith_core::config::{parse_duration, Params};
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
};
use blocksmith_core::sched::Sched;

pub const SPEC: FilterSpec = FilterSpec {
    name: "time-limit",
    summary: "limit how long each client may stay connected",
    params: &[ParamSpec {
        name: "time-limit",
        help: "Connection time limit: seconds or with a unit, e.g. 60 (default), 1.5, 100ms, 2m.",
    }],
    make,
};

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let limit = match p.take("time-limit") {
        None => Duration::from_secs(60),
        Some(v) => {
            parse_duration(&v).map_err(|e| ConfigError::new(format!("time-limit: time-limit: {}", e.0)))?
        }
    };
    if limit.is_zero() {
        return Err(ConfigError::new("time-limit: time-limit must be more than 0"));
    }
    Ok(Arc::new(TimeLimitFactory(limit)))
}

struct TimeLimitFactory(Duration);

impl FilterFactory for TimeLimitFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let filter = TimeLimit { deadline: cx.sched.now() + self.0, limit: self.0, sched: cx.sched.clone() };
        // A timer, so an idle client is dropped too, not only one that sends a request. If the
        // client has gone by then, the request is ignored.
        let disconnect = cx.disconnect.clone();
        let peer = cx.peer.clone();
        let limit = self.0;
        cx.sched.after(self.0, move || {
            ::log::info!("time-limit: client {peer} reached the limit of {limit:?}: disconnecting");
            disconnect.request(false)
        });
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

struct TimeLimit {
    deadline: Instant,
    limit: Duration,
    sched: Sched,
}

impl TimeLimit {
    fn expired(&self) -> Option<NbdError> {
        (self.sched.now() >= self.deadline).then(|| {
            NbdError::msg(Errno::Shutdown, format!("time limit ({:?}) exceeded, disconnect", self.limit))
        })
    }
}

impl Filter for TimeLimit {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        match self.expired() {
            Some(e) => done.err(e),
            None => next.pread(buf, offset, flags, done),
        }
    }
    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        match self.expired() {
            Some(e) => done.err(e),
            None => next.pwrite(data, offset, flags, done),
        }
    }
    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        match self.expired() {
            Some(e) => done.err(e),
            None => next.flush(flags, done),
        }
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.expired() {
            Some(e) => done.err(e),
            None => next.trim(count, offset, flags, done),
        }
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.expired() {
            Some(e) => done.err(e),
            None => next.zero(count, offset, flags, done),
        }
    }
    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        match self.expired() {
            Some(e) => done.err(e),
            None => next.extents(count, offset, flags, done),
        }
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.expired() {
            Some(e) => done.err(e),
            None => next.cache(count, offset, flags, done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn the_client_is_disconnected_at_the_limit() {
        let sim = SimScheduler::new();
        let c = cx(&sim);
        let top = open(&configure(&SPEC, &[("time-limit", "2s")]), &c, Ram::new(4096)).unwrap();
        // Before the limit nobody asked for a disconnect.
        assert_eq!(c.disconnect.requested(), None);
        // The limit's timer fires even though the client is idle.
        sim.run_until_idle();
        assert!(sim.elapsed() >= Duration::from_secs(2));
        assert_eq!(c.disconnect.requested(), Some(false), "graceful: in-flight requests are answered");
        let e = wait(&sim, |d| top.pread(vec![0; 10], 0, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Shutdown);
        assert_eq!(
            wait(&sim, |d| top.pwrite(vec![0; 1], 0, Flags::NONE, d)).unwrap_err().errno,
            Errno::Shutdown
        );
        // A client that connects later has its own clock.
        let late = open(&configure(&SPEC, &[("time-limit", "2s")]), &cx(&sim), Ram::new(4096)).unwrap();
        wait(&sim, |d| late.pread(vec![0; 10], 0, Flags::NONE, d)).unwrap();
    }

    #[test]
    fn bad_limits_are_rejected() {
        assert!(make_err(&SPEC, &[("time-limit", "soon")]).contains("could not parse duration"));
        assert!(make_err(&SPEC, &[("time-limit", "0")]).contains("more than 0"));
    }
}
