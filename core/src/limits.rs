//! Every bound the server enforces, as a named constant. Those a user may need to change are
//! also command-line options (named beside each); the constant is then the default.

use std::time::Duration;

/// Largest READ/WRITE payload served (`--max-request`). The nbd project's integrity test sends
/// 48 MiB writes and nbdkit accepts 64 MiB, so we do too; we advertise it as the maximum block
/// size. A WRITE header above it is answered EINVAL and the connection closed (its payload is
/// never buffered); a READ above it gets EINVAL.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024 * 1024;

/// Advertised preferred block size.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Longest option payload we skip for an unknown option; above it the client is treated as a
/// denial of service and disconnected. Known options are far smaller.
pub const MAX_OPTION_BYTES: u32 = 4 * 1024 * 1024;

/// Largest NBD string (export name, description, context name), from the spec.
pub const MAX_STRING_BYTES: usize = 4096;

/// Options one connection may send before we call it abuse and disconnect.
pub const MAX_OPTIONS_PER_CONN: u32 = 256;

/// Meta-context queries in one LIST/SET option.
pub const MAX_META_QUERIES: u32 = 128;

/// Handshake deadline (`--timeout`): a client that has not reached transmission by then is
/// disconnected. qemu-nbd uses 10 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests in flight on one connection (`--max-in-flight`); at the cap we stop reading.
pub const MAX_IN_FLIGHT_PER_CONN: usize = 64;

/// Bytes of replies queued for a client that is not reading them; above this we stop reading
/// its requests until it drains.
pub const MAX_QUEUED_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// Size of each connection's header-read buffer.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Requests decoded from one connection per turn of the loop before other connections get a
/// go (fairness between clients sharing a loop).
pub const REQUESTS_PER_TURN: usize = 16;

/// Most block-status descriptors in one reply (spec: SHOULD be at most 2^20).
pub const MAX_EXTENTS_PER_REPLY: usize = 1 << 20;

/// Default server-wide budget for request and reply payloads (`--memory-limit`).
pub const DEFAULT_MEMORY_LIMIT: usize = 1024 * 1024 * 1024;

/// Threads in the pool that runs blocking file IO off the event loops (`--io-threads`).
pub const DEFAULT_IO_THREADS: usize = 8;

/// Jobs queued for the blocking pool before submitters must wait for completions.
pub const MAX_BLOCKING_QUEUE: usize = 4096;

/// Listen backlog: large, so a herd of clients connecting at once is queued by the kernel rather
/// than dropped into SYN retransmits.
pub const LISTEN_BACKLOG: i32 = 4096;
