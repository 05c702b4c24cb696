//! The event loops and everything that touches the operating system.
//!
//! - [`reactor`]: one loop's scheduler (timers, deferred tasks, blocking-pool completions) and
//!   the shared blocking pool.
//! - [`server`]: listeners, accepting, and the driver that moves bytes between sockets and
//!   `conn::Conn`, and requests between `Conn` and the layer stack.
//! - [`transport`]: the byte streams a connection can run over (TCP, Unix, stdin/stdout).
//! - [`uring`]: file IO through io_uring, one ring per loop, completions on the same loop.
//! - [`moderation`]: when a loop holds a wake-up's replies for a moment to batch them.
//! - [`process`]: daemonizing, parent-death signals, and other process plumbing.
//!
//! The readiness contract, written once: mio is edge-triggered, so a readable or writable event
//! means "there may be bytes now", and stays true for us until a read or write returns
//! `WouldBlock`. The driver therefore keeps a `readable`/`writable` flag per connection, clears
//! it only on `WouldBlock`, and puts a connection it stopped serving early (fairness,
//! backpressure) back on the run queue rather than waiting for another event that will not come.

pub mod aligned;
pub mod moderation;
pub mod process;
pub mod reactor;
pub mod server;
pub mod transport;
pub mod uring;
