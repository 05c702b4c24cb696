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

// ---------------------------------------------------------------------------------------------
// Memory: the budget and what lies beside it (see `memory_overhead`)
// ---------------------------------------------------------------------------------------------

/// The process without clients: code, libraries, the main threads' stacks, the IO pool.
/// Measured 5.7 MiB resident (glibc, 8 IO threads, 1 or 2 loops).
pub const BASE_OVERHEAD_BYTES: usize = 8 * 1024 * 1024;

/// Each event loop: its thread's stack, poller, event array, timers. Measured about 70 KiB
/// (5.8 MiB with 1 loop, 7.1 MiB with 16, 10.3 MiB with 64), plus at most about 36 KiB of
/// recycled reply header segments (`conn::output::MAX_SPARE_HEADERS`).
pub const LOOP_OVERHEAD_BYTES: usize = 128 * 1024;

/// The server's state for one connection (its slot, `Conn`, output queue, layer instances),
/// beside any read buffer. Measured 1.6 KB per idle client.
pub const CONN_OVERHEAD_BYTES: usize = 2 * 1024;

/// The documented bound on the server's resident memory beyond `--memory-limit`.
///
/// `--memory-limit` bounds the payload bytes of requests and replies in flight, and TLS
/// sessions (see `budget`). Resident memory is at most the limit plus this overhead, the sum
/// of:
///
/// 1. **The process**: [`BASE_OVERHEAD_BYTES`] (8 MiB) + [`LOOP_OVERHEAD_BYTES`] (128 KiB)
///    per event loop.
/// 2. **Recycled payload buffers**: per loop at most `bufpool::pool_cap(limit, loops)` =
///    min(64 MiB, limit / 8 / loops), so at most 1/8 of the limit in all.
/// 3. **Per connection**: [`CONN_OVERHEAD_BYTES`] (2 KiB), plus its [`READ_BUFFER_BYTES`]
///    (64 KiB) header buffer while it holds unread input. That includes a client whose next
///    request waits for budget: the buffer holds the header and the first bytes of the
///    payload. `connections` counts every client as holding one (the worst case, as in a
///    write flood where all but a few wait for budget).
/// 4. **Allocator slack**: one largest request (`max_request`). A freed payload buffer goes
///    back to glibc's arena, which may grow past the live data when holes left between
///    smaller allocations do not fit the next buffer. There is one arena for all threads
///    (`bufpool::configure`), so memory freed by one loop is reused by the others. Measured up
///    to about one request (about 16 MiB with 200 clients writing 16 MiB under a 64 MiB limit);
///    buffers of 32 MiB and more are separate mappings that go back to the kernel when freed.
///
/// Not counted: the backend's own data (a `memory` disk's pages), the kernel's socket buffers
/// (not process memory), and the `file` backend's O_DIRECT bounce-buffer pool (`io::aligned`,
/// up to 16 MiB per thread doing O_DIRECT IO).
///
/// Measured with `bench/flood.sh` (1000 clients × 32 MiB writes, 2 cores, four runs): peak
/// RSS 248–285 MiB under a 256 MiB limit and 753–863 MiB under 1 GiB; nbdkit passed 4 GiB.
pub fn memory_overhead(memory_limit: usize, max_request: usize, loops: usize, connections: usize) -> usize {
    let loops = loops.max(1);
    let pools = crate::bufpool::pool_cap(memory_limit, loops) * loops;
    BASE_OVERHEAD_BYTES
        + loops * LOOP_OVERHEAD_BYTES
        + pools
        + connections * (CONN_OVERHEAD_BYTES + READ_BUFFER_BYTES)
        + max_request
}

/// The budget used when the machine's memory cannot be read (no `/proc/meminfo`), and by tests
/// that build a server in-process. The binary's default is [`default_memory_limit`].
pub const DEFAULT_MEMORY_LIMIT: usize = 1024 * 1024 * 1024;

/// The default `--memory-limit` is this fraction (1/N) of the memory the process may use:
/// physical memory, or the cgroup's limit when that is smaller.
///
/// Why 1/8: the budget only bounds request and reply payloads in flight; the rest of the
/// machine still needs memory for the backend's own data (a `memory` disk lives outside the
/// budget), the page cache of a `file` backend, and whatever else runs there. Throughput does
/// not need much: bytes in flight are bandwidth × latency, so 10 Gbit/s at 100 ms is 125 MB,
/// and on a 4 GiB machine 1/8 is 512 MiB, four times that. A larger share would only let more
/// clients park more data in the server, not move it faster.
pub const DEFAULT_MEMORY_LIMIT_FRACTION: u64 = 8;

/// Ceiling of the computed default, whatever the machine: 16 GiB is 256 requests of the
/// largest size ([`MAX_REQUEST_BYTES`]) in flight, and over a second of 100 Gbit/s traffic.
/// Above it the default would only be memory given away; `--memory-limit` goes higher.
pub const MAX_DEFAULT_MEMORY_LIMIT: u64 = 16 << 30;

/// The floor of the computed default is twice the largest request (`--max-request`), the least
/// the server accepts: one largest request can be received while another one's reply is
/// still being sent. On a machine so small that 1/8 of it is below that (under 1 GiB with the
/// default 64 MiB requests), the floor wins.
pub const MIN_MEMORY_LIMIT_REQUESTS: u64 = 2;

/// What the machine says about memory, read at start-up (see [`MachineMemory::read`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineMemory {
    /// `MemTotal` from `/proc/meminfo`, in bytes.
    pub mem_total: Option<u64>,
    /// The smallest memory limit of our cgroup and its ancestors, in bytes (cgroup v2
    /// `memory.max`/`memory.high`, or v1 `memory.limit_in_bytes`); `None` when unlimited.
    pub cgroup_limit: Option<u64>,
}

/// Where the memory limit in use came from, for `-v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitSource {
    /// `--memory-limit`.
    CommandLine,
    /// 1/8 of physical memory.
    PhysicalMemory(u64),
    /// 1/8 of the cgroup's limit (smaller than physical memory).
    Cgroup(u64),
    /// Neither could be read: [`DEFAULT_MEMORY_LIMIT`].
    Fallback,
}

/// The memory limit in use and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub source: LimitSource,
    /// The computed share was raised to the floor or lowered to the ceiling.
    pub clamped: bool,
}

/// The default `--memory-limit` for a machine: 1/[`DEFAULT_MEMORY_LIMIT_FRACTION`] of the
/// smaller of physical memory and the cgroup limit, rounded down to a MiB, clamped to
/// [[`MIN_MEMORY_LIMIT_REQUESTS`] × `max_request`, [`MAX_DEFAULT_MEMORY_LIMIT`]] (the floor
/// wins if the two cross, since the server refuses less). A pure function of its inputs, so it
/// is tested with numbers rather than with the machine it runs on.
pub fn default_memory_limit(machine: MachineMemory, max_request: u32) -> MemoryLimit {
    let floor = MIN_MEMORY_LIMIT_REQUESTS * u64::from(max_request);
    let (base, source) = match (machine.mem_total, machine.cgroup_limit) {
        (Some(m), Some(c)) if c < m => (c, LimitSource::Cgroup(c)),
        (None, Some(c)) => (c, LimitSource::Cgroup(c)),
        (Some(m), _) => (m, LimitSource::PhysicalMemory(m)),
        (None, None) => {
            let bytes = (DEFAULT_MEMORY_LIMIT as u64).max(floor);
            return MemoryLimit {
                bytes,
                source: LimitSource::Fallback,
                clamped: bytes != DEFAULT_MEMORY_LIMIT as u64,
            };
        }
    };
    let share = base / DEFAULT_MEMORY_LIMIT_FRACTION / MIB * MIB;
    let bytes = share.min(MAX_DEFAULT_MEMORY_LIMIT).max(floor);
    MemoryLimit { bytes, source, clamped: bytes != share }
}

const MIB: u64 = 1 << 20;

impl MachineMemory {
    /// Read `/proc/meminfo` and the memory limits of our cgroup (v2 or v1) and of every
    /// ancestor we can see. Anything unreadable is `None`; this never fails.
    pub fn read() -> MachineMemory {
        let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_meminfo_total(&s));
        let cgroup_limit = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .map(|s| cgroup_limit_files(&s, std::path::Path::new("/sys/fs/cgroup")))
            .unwrap_or_default()
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok().and_then(|s| parse_cgroup_limit(&s)))
            .min();
        MachineMemory { mem_total, cgroup_limit }
    }
}

/// `MemTotal` in bytes from the text of `/proc/meminfo` (`MemTotal:   24684096 kB`).
pub fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut it = line.split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    let mult = match it.next() {
        None => 1,
        Some(u) if u.eq_ignore_ascii_case("kb") => 1024,
        Some(_) => return None,
    };
    n.checked_mul(mult).filter(|&b| b > 0)
}

/// A cgroup memory limit file's value in bytes; `None` for "max" (v2's no limit), for v1's
/// "no limit" (a number near 2^63, anything at or above 2^62 here), and for garbage.
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&n| n > 0 && n < 1 << 62)
}

/// The files that may hold a memory limit for the process, from the text of
/// `/proc/self/cgroup` and where the cgroup filesystems are mounted (`root`, normally
/// `/sys/fs/cgroup`): for cgroup v2 (`0::/a/b`) `memory.max` and `memory.high` in `/a/b`, `/a`
/// and the root; for v1 (`4:memory:/a/b`) `memory.limit_in_bytes` in `memory/a/b`, `memory/a`
/// and `memory`. A limit on an ancestor binds us too, so the caller takes the smallest. Inside a
/// cgroup namespace the path is `/` and the root files are our own cgroup's.
pub fn cgroup_limit_files(proc_self_cgroup: &str, root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (base, names): (std::path::PathBuf, &[&str]) = if id == "0" && controllers.is_empty() {
            // The unified hierarchy: at the root when it is the only one, at `unified` in
            // hybrid setups (where it normally has no memory controller).
            let base = if root.join("cgroup.controllers").exists() || !root.join("unified").exists() {
                root.to_path_buf()
            } else {
                root.join("unified")
            };
            (base, &["memory.max", "memory.high"])
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), &["memory.limit_in_bytes"])
        } else {
            continue;
        };
        // The cgroup's own directory and every ancestor up to the hierarchy's root.
        let mut dir = std::path::PathBuf::from(path.trim());
        loop {
            let rel = dir.strip_prefix("/").unwrap_or(&dir);
            for n in names {
                files.push(base.join(rel).join(n));
            }
            if !dir.pop() {
                break;
            }
        }
    }
    files
}

impl std::fmt::Display for MemoryLimit {
    /// `2.9 GiB (default: 1/8 of 23.5 GiB physical memory)`, for `-v`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let frac = DEFAULT_MEMORY_LIMIT_FRACTION;
        write!(f, "{}", human_bytes(self.bytes))?;
        match self.source {
            LimitSource::CommandLine => write!(f, " (--memory-limit)")?,
            LimitSource::PhysicalMemory(m) => {
                write!(f, " (default: 1/{frac} of {} physical memory", human_bytes(m))?
            }
            LimitSource::Cgroup(c) => {
                write!(f, " (default: 1/{frac} of the {} cgroup limit", human_bytes(c))?
            }
            LimitSource::Fallback => write!(f, " (default: machine memory unknown")?,
        }
        match (self.source, self.clamped) {
            (LimitSource::CommandLine, _) => Ok(()),
            (_, true) => {
                write!(f, ", clamped to [2 x --max-request, {}])", human_bytes(MAX_DEFAULT_MEMORY_LIMIT))
            }
            (_, false) => write!(f, ")"),
        }
    }
}

/// Bytes for people: `512 B`, `64.0 MiB`, `2.9 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Threads in the pool that runs blocking file IO off the event loops (`--io-threads`).
pub const DEFAULT_IO_THREADS: usize = 8;

/// How long a loop may hold a wake-up's replies while more requests arrive, once clients are
/// seen keeping several in flight (`--reply-hold`; `io::moderation`).
pub const DEFAULT_REPLY_HOLD: std::time::Duration = std::time::Duration::from_micros(50);
/// The longest `--reply-hold` accepted: beyond this the added latency outweighs any batching.
pub const MAX_REPLY_HOLD: std::time::Duration = std::time::Duration::from_millis(1);

/// Jobs queued for the blocking pool before submitters must wait for completions.
pub const MAX_BLOCKING_QUEUE: usize = 4096;

/// Listen backlog: large, so a herd of clients connecting at once is queued by the kernel rather
/// than dropped into SYN retransmits.
pub const LISTEN_BACKLOG: i32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    const GIB: u64 = 1 << 30;
    const MAX_REQ: u32 = MAX_REQUEST_BYTES;

    fn limit(mem: Option<u64>, cgroup: Option<u64>) -> MemoryLimit {
        default_memory_limit(MachineMemory { mem_total: mem, cgroup_limit: cgroup }, MAX_REQ)
    }

    #[test]
    fn default_is_an_eighth_of_the_smaller_of_memory_and_cgroup() {
        let l = limit(Some(24 * GIB), None);
        assert_eq!((l.bytes, l.source, l.clamped), (3 * GIB, LimitSource::PhysicalMemory(24 * GIB), false));
        // A cgroup limit below physical memory wins; one above it does not.
        let l = limit(Some(24 * GIB), Some(4 * GIB));
        assert_eq!((l.bytes, l.source), (512 << 20, LimitSource::Cgroup(4 * GIB)));
        let l = limit(Some(8 * GIB), Some(64 * GIB));
        assert_eq!((l.bytes, l.source), (GIB, LimitSource::PhysicalMemory(8 * GIB)));
        // A cgroup limit alone (no /proc/meminfo) is used.
        assert_eq!(limit(None, Some(16 * GIB)).bytes, 2 * GIB);
        // Rounded down to a MiB: 24684096 kB (this class of machine) / 8.
        assert_eq!(limit(Some(24_684_096 * 1024), None).bytes, 3013 << 20);
    }

    #[test]
    fn default_is_clamped() {
        // Small machine: 1/8 of 512 MiB is below twice the largest request.
        let l = limit(Some(512 << 20), None);
        assert_eq!((l.bytes, l.clamped), (2 * u64::from(MAX_REQ), true));
        let l = limit(Some(24 * GIB), Some(256 << 20));
        assert_eq!((l.bytes, l.clamped), (128 << 20, true));
        // The floor follows --max-request.
        let m = MachineMemory { mem_total: Some(GIB), cgroup_limit: None };
        assert_eq!(default_memory_limit(m, 1 << 30).bytes, 2 * GIB);
        assert_eq!(default_memory_limit(m, 1 << 20).bytes, 128 << 20);
        // Big machine: capped at 16 GiB.
        let l = limit(Some(1 << 40), None);
        assert_eq!((l.bytes, l.clamped), (MAX_DEFAULT_MEMORY_LIMIT, true));
        assert_eq!(limit(Some(128 * GIB), None).bytes, 16 * GIB);
        // Nothing known: the old fixed default.
        let l = limit(None, None);
        assert_eq!((l.bytes, l.source), (DEFAULT_MEMORY_LIMIT as u64, LimitSource::Fallback));
        // Degenerate inputs do not panic.
        assert_eq!(limit(Some(1), Some(1)).bytes, 2 * u64::from(MAX_REQ));
        assert_eq!(limit(Some(u64::MAX), None).bytes, MAX_DEFAULT_MEMORY_LIMIT);
    }

    #[test]
    fn meminfo_and_cgroup_files_are_parsed() {
        let meminfo = "MemFree:        22000000 kB\nMemTotal:       24684096 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(24_684_096 * 1024));
        assert_eq!(parse_meminfo_total("MemTotal: 1000\n"), Some(1000));
        for bad in ["", "MemTotal:\n", "MemTotal: x kB\n", "MemTotal: 5 MB\n", "MemTotal: 0 kB\n"] {
            assert_eq!(parse_meminfo_total(bad), None, "{bad:?}");
        }
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("1073741824\n"), Some(GIB));
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None, "v1's no-limit value");
        assert_eq!(parse_cgroup_limit("0\n"), None);
        assert_eq!(parse_cgroup_limit("lots"), None);
    }

    #[test]
    fn cgroup_files_cover_the_cgroup_and_its_ancestors() {
        let root = Path::new("/nonexistent-cgroup-root");
        let p = |s: &str| root.join(s);
        let v2 = cgroup_limit_files("0::/system.slice/nbd.service\n", root);
        assert_eq!(
            v2,
            vec![
                p("system.slice/nbd.service/memory.max"),
                p("system.slice/nbd.service/memory.high"),
                p("system.slice/memory.max"),
                p("system.slice/memory.high"),
                p("memory.max"),
                p("memory.high"),
            ]
        );
        assert_eq!(cgroup_limit_files("0::/\n", root), vec![p("memory.max"), p("memory.high")]);
        let v1 = "12:pids:/a\n4:cpu,memory:/process_api/x1\n1:name=systemd:/\n";
        assert_eq!(
            cgroup_limit_files(v1, root),
            vec![
                p("memory/process_api/x1/memory.limit_in_bytes"),
                p("memory/process_api/memory.limit_in_bytes"),
                p("memory/memory.limit_in_bytes"),
            ]
        );
        assert_eq!(cgroup_limit_files("garbage\n\n", root), Vec::<PathBuf>::new());
    }

    #[test]
    fn overhead_adds_up() {
        const MIB: usize = 1 << 20;
        const KIB: usize = 1 << 10;
        // 64 MiB limit, 32 MiB requests, 2 loops, 64 clients:
        // 8 MiB + 2 × 128 KiB + 2 × 4 MiB of pools + 64 × 66 KiB + 32 MiB.
        assert_eq!(
            memory_overhead(64 * MIB, 32 * MIB, 2, 64),
            8 * MIB + 256 * KIB + 8 * MIB + 64 * 66 * KIB + 32 * MIB
        );
        // 1 GiB, 2 loops, no clients: the pools are at their 64 MiB cap.
        assert_eq!(memory_overhead(1024 * MIB, 64 * MIB, 2, 0), 8 * MIB + 256 * KIB + 128 * MIB + 64 * MIB);
        assert_eq!(memory_overhead(1024 * MIB, 64 * MIB, 0, 0), memory_overhead(1024 * MIB, 64 * MIB, 1, 0));
    }

    #[test]
    fn the_limit_in_use_is_described() {
        let l = limit(Some(24 * GIB), None);
        assert_eq!(l.to_string(), "3.0 GiB (default: 1/8 of 24.0 GiB physical memory)");
        let l = limit(Some(24 * GIB), Some(256 << 20));
        assert_eq!(
            l.to_string(),
            "128.0 MiB (default: 1/8 of the 256.0 MiB cgroup limit, clamped to [2 x --max-request, 16.0 GiB])"
        );
        let l = MemoryLimit { bytes: 64 << 20, source: LimitSource::CommandLine, clamped: false };
        assert_eq!(l.to_string(), "64.0 MiB (--memory-limit)");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
