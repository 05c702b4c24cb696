//! Running a request as a series of smaller asynchronous steps (blocksize's pieces, protect's and
//! checkwrite's comparisons, partition's EBR chain) without nesting callbacks without bound.
//!
//! Over a RAM disk every step completes before the call that started it returns; chaining the
//! next step from inside that completion would recurse once per step, and a 64 MiB request cut
//! into 4 KiB pieces would need 16384 nested frames. [`sequence`] is a trampoline: a step that
//! completes synchronously hands control back to the loop that started it, and only a step that
//! completes later restarts the loop from its own completion.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use blocksmith_core::error::NbdError;
use blocksmith_core::layer::{Done, Flags, Next};

/// One step: start an operation and call the completion exactly once.
pub type Step = Box<dyn FnOnce(Done<()>)>;

/// Largest buffer read at once when a range is checked rather than served.
pub const CHUNK: u64 = 1 << 20;

struct Seq {
    next_step: RefCell<Box<dyn FnMut() -> Option<Step>>>,
    done: RefCell<Option<Done<()>>>,
    running: Cell<bool>,
    resumed: Cell<bool>,
}

/// Run the steps `next_step` produces, each after the previous one succeeded, until it returns
/// `None`; then complete `done`. The first failure completes `done` with that error and no
/// further step is asked for. Whatever `next_step` captured is dropped before `done` runs, so
/// an `Rc` it shared with the caller is unique again by then.
pub fn sequence(next_step: impl FnMut() -> Option<Step> + 'static, done: Done<()>) {
    let seq = Rc::new(Seq {
        next_step: RefCell::new(Box::new(next_step)),
        done: RefCell::new(Some(done)),
        running: Cell::new(false),
        resumed: Cell::new(false),
    });
    pump(seq);
}

fn finish(seq: &Seq, r: Result<(), NbdError>) {
    *seq.next_step.borrow_mut() = Box::new(|| None);
    let done = seq.done.borrow_mut().take();
    if let Some(d) = done {
        d.call(r)
    }
}

fn pump(seq: Rc<Seq>) {
    if seq.running.get() {
        // A step completed inside the loop below: let that loop carry on.
        seq.resumed.set(true);
        return;
    }
    seq.running.set(true);
    loop {
        seq.resumed.set(false);
        let step = (seq.next_step.borrow_mut())();
        let Some(step) = step else {
            seq.running.set(false);
            return finish(&seq, Ok(()));
        };
        let s = seq.clone();
        step(Done::new(move |r: Result<(), NbdError>| match r {
            Ok(()) => pump(s),
            Err(e) => finish(&s, Err(e)),
        }));
        if !seq.resumed.get() {
            // Still running, or failed: either way the completion takes it from here.
            seq.running.set(false);
            return;
        }
    }
}

/// Read `count` bytes from `offset` through `next`, at most [`CHUNK`] at a time, and hand each
/// piece to `check` with its offset; the first error from a read or from `check` is the result.
pub fn check_range(
    next: &Next,
    offset: u64,
    count: u64,
    mut check: impl FnMut(u64, &[u8]) -> Result<(), NbdError> + 'static,
    done: Done<()>,
) {
    let next = next.clone();
    let end = offset.saturating_add(count);
    let check_cell = Rc::new(RefCell::new(move |o: u64, b: &[u8]| check(o, b)));
    let mut pos = offset;
    sequence(
        move || {
            if pos >= end {
                return None;
            }
            let (o, n) = (pos, (end - pos).min(CHUNK));
            pos += n;
            let next = next.clone();
            let check = check_cell.clone();
            Some(Box::new(move |k: Done<()>| {
                next.pread(
                    vec![0u8; n as usize],
                    o,
                    Flags::NONE,
                    k.map(move |r: Result<Vec<u8>, NbdError>| {
                        r.and_then(|buf| (check.borrow_mut())(o, &buf))
                    }),
                )
            }))
        },
        done,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{wait, Ram};
    use blocksmith_core::error::Errno;
    use blocksmith_core::layer::shim::Shim;
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn many_synchronous_steps_do_not_recurse() {
        // 200k steps that each complete at once would overflow the stack if each nested.
        let sim = SimScheduler::new();
        let count = Rc::new(Cell::new(0u32));
        let c = count.clone();
        let mut left = 200_000u32;
        wait(&sim, |d| {
            sequence(
                move || {
                    if left == 0 {
                        return None;
                    }
                    left -= 1;
                    let c = c.clone();
                    Some(Box::new(move |k: Done<()>| {
                        c.set(c.get() + 1);
                        k.ok(())
                    }))
                },
                d,
            )
        })
        .unwrap();
        assert_eq!(count.get(), 200_000);
    }

    #[test]
    fn asynchronous_steps_and_the_first_error_stop_the_sequence() {
        let sim = SimScheduler::new();
        let s = sim.sched();
        let ran = Rc::new(RefCell::new(Vec::new()));
        let r2 = ran.clone();
        let mut i = 0;
        let e = wait(&sim, |d| {
            sequence(
                move || {
                    i += 1;
                    let (s, ran, n) = (s.clone(), r2.clone(), i);
                    Some(Box::new(move |k: Done<()>| {
                        s.after(std::time::Duration::from_millis(1), move || {
                            ran.borrow_mut().push(n);
                            if n == 3 {
                                k.err(NbdError::io("third fails"))
                            } else {
                                k.ok(())
                            }
                        });
                    }))
                },
                d,
            )
        })
        .unwrap_err();
        assert_eq!(e.errno, Errno::Io);
        assert_eq!(*ran.borrow(), [1, 2, 3]);
    }

    #[test]
    fn check_range_reads_in_chunks() {
        let sim = SimScheduler::new();
        let ram = Ram::new(3 << 20);
        let next: Next = Shim::new(ram.clone(), false);
        let seen = Rc::new(RefCell::new(Vec::new()));
        let s2 = seen.clone();
        wait(&sim, |d| {
            check_range(
                &next,
                100,
                (2 << 20) + 5,
                move |o, b| {
                    s2.borrow_mut().push((o, b.len()));
                    Ok(())
                },
                d,
            )
        })
        .unwrap();
        assert_eq!(*seen.borrow(), [(100, 1 << 20), (100 + (1 << 20), 1 << 20), (100 + (2 << 20), 5)]);
        let e = wait(&sim, |d| check_range(&next, 0, 10, |_, _| Err(NbdError::new(Errno::Perm)), d));
        assert_eq!(e.unwrap_err().errno, Errno::Perm);
    }
}
