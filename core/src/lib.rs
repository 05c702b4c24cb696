//! blocksmith core: the NBD protocol as a sans-IO codec and connection state machine, the
//! nonblocking layer model shared by backends and filters, and the mio reactor that drives it.
//!
//! Module map (see `docs/architecture.md` for the why):
//! - [`proto`]: wire constants and a pure codec (bytes in, typed messages out and back).
//! - [`conn`]: one client's state machine, greeting → options → transmission → closed. No IO.
//! - [`layer`]: the `Layer` interface, the pass-through `Filter` adapter, the validating shim and
//!   the stack that strings backends and filters together.
//! - [`sched`]: the `Scheduler` a layer uses to wait (timers, blocking work off the loop),
//!   with a virtual-clock implementation for tests.
//! - [`io`]: the event loops (mio), listeners, and the connection driver.
//! - [`limits`]: every bound, as a named constant.
//! - [`config`]: parameter parsing shared by every backend and filter.
//! - [`control`]: server-wide state layers may act on (shutdown, connection count).
//! - [`tls`]: STARTTLS sessions (rustls certificates, OpenSSL pre-shared keys), sans IO.

pub mod budget;
pub mod bufpool;
pub mod config;
pub mod conn;
pub mod control;
pub mod error;
pub mod io;
pub mod layer;
pub mod limits;
pub mod proto;
pub mod sched;
pub mod tls;

pub use error::{ConfigError, NbdError};
