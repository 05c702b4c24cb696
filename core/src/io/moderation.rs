//! Reply moderation: when a client keeps many requests in flight, an event loop that answers
//! each wake-up at once goes through one wake-up, one read and one write per request or two,
//! and so does the client. Holding a wake-up's replies for a moment (`--reply-hold`, 50 µs)
//! lets the requests already on their way arrive meanwhile: they are read, answered and sent
//! together, and both sides pay the kernel's per-call and per-segment costs once per batch.
//! (Network cards do the same with their interrupts.) Measured on 4K reads at queue depth 32:
//! about half the server CPU per request, and more IOPS, not fewer (`tuning.md`).
//!
//! Holding pays only while the client has more to send than it is waiting for; a client whose
//! requests are all with the server (queue depth 1, 2 or 4) just waits out the hold. So:
//! - the loop holds only after it has seen pipelining (a connection bringing two or more
//!   requests in one wake-up): a queue-depth-1 client is never held;
//! - a hold during which no held connection sent two more requests ends holding at once
//!   (queue depth 2: the second of a pair joining the first is no reason to delay every pair;
//!   and a thousand such clients each sending one more is no reason either);
//! - holding is a trial against the request rate measured just before it: if the loop serves
//!   fewer requests per second holding than it did without (queue depth 4, where every hold
//!   starves the client), it stops; and a hold that passed is put to the test again every
//!   `RECHECK`, since clients change.
//!
//! After a failed trial or a fruitless hold the loop waits before trying again, twice as long
//! each time (from `MIN_BACKOFF` to `MAX_BACKOFF`). This is the loop's decision only (sans-IO,
//! tested with a made-up clock below); `io::server::Loop` does the holding, and with it two
//! per-client rules: only the replies of clients that have pipelined are held, and since the
//! hold sleeps the loop, none is held while a client that has never pipelined (one waiting on
//! each reply) has sent a request in the last 10 ms: it would wait out the hold as well.

use std::time::{Duration, Instant};

/// Requests one held connection must send during a hold for holding to go on.
const REWARD: u64 = 2;
/// The time over which a request rate is measured, holding or not.
const MEASURE: Duration = Duration::from_millis(10);
/// How often holding is tested again against not holding.
const RECHECK: Duration = Duration::from_millis(500);
/// Holding must keep at least this share of the rate measured without it.
const KEEP: f64 = 0.9;
/// The wait after the first failure (a fruitless hold or a lost trial); it doubles with each
/// further one, up to `MAX_BACKOFF`, and is reset by a won trial.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Not holding since `since` (with `total` requests then); no attempt before `until`.
    Off { since: Instant, total: u64, until: Instant },
    /// Holding since `since`; `against` is the rate without holding it must keep up with
    /// (`None` once it has).
    On { since: Instant, total: u64, against: Option<f64> },
}

/// One event loop's moderation state.
#[derive(Debug)]
pub struct Moderation {
    /// How long replies wait; zero disables moderation.
    hold: Duration,
    mode: Mode,
    /// How long the next failure keeps holding off.
    backoff: Duration,
}

impl Moderation {
    pub fn new(hold: Duration, now: Instant) -> Moderation {
        Moderation { hold, mode: Mode::Off { since: now, total: 0, until: now }, backoff: MIN_BACKOFF }
    }

    /// How long this wake-up's replies should wait, if at all.
    pub fn hold(&self) -> Option<Duration> {
        match self.mode {
            Mode::On { .. } if !self.hold.is_zero() => Some(self.hold),
            _ => None,
        }
    }

    /// A wake-up served without holding, at `now`, with `total` requests received by the loop
    /// so far. `pipelined`: some connection brought two or more requests at once.
    pub fn served(&mut self, now: Instant, total: u64, pipelined: bool) {
        let Mode::Off { since, total: at, until } = self.mode else { return };
        // Attempt only with a rate to measure against: after a whole MEASURE without holding.
        if self.hold.is_zero() || !pipelined || now < until || now.duration_since(since) < MEASURE {
            return;
        }
        let against = Some(rate(total - at, now.duration_since(since)));
        self.mode = Mode::On { since: now, total, against };
    }

    /// A wake-up whose replies were held, at `now`, with `total` requests received by the loop
    /// so far; `arrived`: the most requests one held connection sent while they waited.
    pub fn held(&mut self, now: Instant, total: u64, arrived: u64) {
        let Mode::On { since, total: at, against } = self.mode else { return };
        let on_for = now.duration_since(since);
        if arrived < REWARD {
            return self.back_off(now, total);
        }
        match against {
            Some(off_rate) if on_for >= MEASURE => {
                if rate(total - at, on_for) < KEEP * off_rate {
                    return self.back_off(now, total);
                }
                // Passed: hold on, and test again later.
                self.backoff = MIN_BACKOFF;
                self.mode = Mode::On { since: now, total, against: None };
            }
            None if on_for >= RECHECK => {
                // Measure without holding again; holding resumes after MEASURE if it still wins.
                self.mode = Mode::Off { since: now, total, until: now };
            }
            _ => {}
        }
    }

    fn back_off(&mut self, now: Instant, total: u64) {
        self.mode = Mode::Off { since: now, total, until: now + self.backoff };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Requests per second.
fn rate(requests: u64, over: Duration) -> f64 {
    requests as f64 / over.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_micros(50);

    /// A loop under a steady load, on a made-up clock: each wake-up brings `batch` requests
    /// `period` apart while not holding; holding, `held_batch` every `held_period`, of which
    /// `arrived` during the hold.
    struct Sim {
        m: Moderation,
        now: Instant,
        total: u64,
        holds: u64,
        wakeups: u64,
    }

    struct Load {
        period: Duration,
        batch: u64,
        held_period: Duration,
        held_batch: u64,
        arrived: u64,
    }

    impl Sim {
        fn new() -> Sim {
            let now = Instant::now();
            Sim { m: Moderation::new(HOLD, now), now, total: 0, holds: 0, wakeups: 0 }
        }
        fn run(&mut self, load: &Load, for_: Duration) {
            let end = self.now + for_;
            while self.now < end {
                self.wakeups += 1;
                if self.m.hold().is_some() {
                    self.holds += 1;
                    self.now += load.held_period;
                    self.total += load.held_batch;
                    self.m.held(self.now, self.total, load.arrived);
                } else {
                    self.now += load.period;
                    self.total += load.batch;
                    self.m.served(self.now, self.total, load.batch >= 2);
                }
            }
        }
    }

    /// Queue depth 32 as measured: pipelining shows (two requests in a wake-up), and holding
    /// serves batches of ~5 at a better rate (71k/s against 50k/s).
    const DEEP: Load = Load {
        period: Duration::from_micros(40),
        batch: 2,
        held_period: Duration::from_micros(70),
        held_batch: 5,
        arrived: 4,
    };

    /// Queue depth 4: holds are rewarded (three arrive), but the client starves meanwhile: 4
    /// requests per 150 µs holding against 4 per 80 µs without.
    const QD4: Load = Load {
        period: Duration::from_micros(80),
        batch: 4,
        held_period: Duration::from_micros(150),
        held_batch: 4,
        arrived: 3,
    };

    #[test]
    fn a_client_that_never_pipelines_is_never_held() {
        let mut s = Sim::new();
        let qd1 = Load { period: Duration::from_micros(20), batch: 1, arrived: 0, ..DEEP };
        s.run(&qd1, Duration::from_secs(5));
        assert_eq!(s.holds, 0);
    }

    #[test]
    fn deep_queues_are_held_nearly_all_the_time() {
        let mut s = Sim::new();
        s.run(&DEEP, Duration::from_secs(5));
        assert!(s.holds * 100 / s.wakeups > 80, "{} holds in {} wake-ups", s.holds, s.wakeups);
    }

    #[test]
    fn pairs_are_rarely_held() {
        // Queue depth 2: both requests of a pair in one wake-up; at most one arrives in a hold.
        let mut s = Sim::new();
        let qd2 = Load { arrived: 1, held_batch: 2, ..DEEP };
        s.run(&qd2, Duration::from_secs(10));
        assert!(s.holds <= 20, "{} holds in {} wake-ups", s.holds, s.wakeups);
    }

    #[test]
    fn holding_that_lowers_the_rate_stops_and_backs_off() {
        let mut s = Sim::new();
        s.run(&QD4, Duration::from_secs(10));
        assert!(s.holds * 100 / s.wakeups < 3, "{} holds in {} wake-ups", s.holds, s.wakeups);
    }

    #[test]
    fn a_winning_hold_is_tested_again_when_the_client_changes() {
        let mut s = Sim::new();
        s.run(&DEEP, Duration::from_secs(1));
        assert!(s.holds * 100 / s.wakeups > 80, "{} holds in {} wake-ups", s.holds, s.wakeups);
        // The same client now at depth 4 (held batches no longer pay): holding stops within a
        // recheck, and stays mostly off.
        let (holds, wakeups) = (s.holds, s.wakeups);
        s.run(&QD4, Duration::from_secs(5));
        let (h, w) = (s.holds - holds, s.wakeups - wakeups);
        assert!(h * 100 / w < 15, "{h} holds in {w} wake-ups");
    }

    #[test]
    fn a_zero_hold_disables_it() {
        let mut s = Sim { m: Moderation::new(Duration::ZERO, Instant::now()), ..Sim::new() };
        s.run(&DEEP, Duration::from_secs(1));
        assert_eq!(s.holds, 0);
    }
}
