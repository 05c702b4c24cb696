//! The server's resource bounds under pressure, against the real binary:
//!
//! - a flood of large writes, far more than `--memory-limit` holds, all succeed, and the
//!   server's peak resident memory (VmHWM) stays under the limit plus the documented overhead
//!   (`blocksmith_core::limits::memory_overhead`);
//! - out of descriptors, the server pauses accepting with one warning, does not spin, keeps
//!   serving the clients it has, and serves a waiting client once a descriptor frees;
//! - the descriptor table is grown for the descriptor limit at start-up, so accepting never
//!   waits for the kernel to grow it.
//!
//! Both are memory or descriptor bounds, not timing assertions; every client IO has a bounded
//! timeout, and everything runs on a Unix socket in a temporary directory.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blocksmith_core::limits::memory_overhead;
use common::raw::{self, CMD_READ, CMD_WRITE};
use common::Server;

/// Bound on any one client read or write in these tests: generous, because a client may wait
/// its turn for budget behind all the others.
const FLOOD_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the whole flood (2 GiB through the server; a few seconds on a quiet machine).
const FLOOD_DEADLINE: Duration = Duration::from_secs(90);

/// The value of a field of `/proc/PID/status`, trimmed (`VmHWM:   80000 kB` gives `80000 kB`).
fn status_field(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    value.trim().to_string()
}

/// A field of `/proc/PID/status` in bytes (`VmHWM:   80000 kB`).
fn status_bytes(pid: i32, field: &str) -> u64 {
    let kb: u64 = status_field(pid, field).trim_end_matches("kB").trim().parse().expect("a number of kB");
    kb * 1024
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("stat format");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// A raw client on the server's socket whose reads and writes time out after `timeout`.
fn raw_client(srv: &Server, timeout: Duration) -> raw::Conn {
    let s = UnixStream::connect(srv.socket_path()).expect("connect to the server");
    let timeouts = s.try_clone().expect("clone socket");
    let c = raw::Conn::new(raw::Stream::Unix(s));
    // The timeouts belong to the socket, which the clone shares.
    timeouts.set_read_timeout(Some(timeout)).expect("read timeout");
    timeouts.set_write_timeout(Some(timeout)).expect("write timeout");
    c
}

#[test]
fn write_flood_stays_within_the_memory_limit() {
    const CLIENTS: usize = 64;
    const WRITE: usize = 32 << 20;
    const LIMIT: usize = 64 << 20;
    const LOOPS: usize = 2;
    // The null backend stores nothing, so what the server holds is what it is sent.
    let mut srv =
        Server::unix(&["--threads", "2", "--memory-limit", "64M", "--max-request", "32M", "null", "4G"]);
    let pid = srv.pid();
    let idle = status_bytes(pid, "VmRSS");
    let payload = Arc::new(vec![0x5au8; WRITE]);
    // Handshakes first, so that no client can fail before the start line and leave the others
    // waiting there.
    let conns: Vec<raw::Conn> = (0..CLIENTS)
        .map(|_| {
            let mut c = raw_client(&srv, FLOOD_IO_TIMEOUT);
            c.handshake();
            c
        })
        .collect();
    let start = Arc::new(Barrier::new(CLIENTS));
    let began = Instant::now();
    let clients: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let (payload, start) = (payload.clone(), start.clone());
            thread::spawn(move || {
                // Every client's 32 MiB is on its way at once: 2 GiB against a 64 MiB budget.
                start.wait();
                let cookie = 0x1000 + i as u64;
                c.request(0, CMD_WRITE, cookie, (i * WRITE) as u64, WRITE as u32);
                c.send(&payload);
                let (err, got) = c.simple_reply();
                assert_eq!((err, got), (0, cookie), "client {i}: the write failed");
            })
        })
        .collect();
    // One deadline for the whole flood (each client IO also has its own timeout): a server that
    // stops reading is killed, so the clients fail at once instead of one timeout at a time.
    while !clients.iter().all(|t| t.is_finished()) {
        if began.elapsed() > FLOOD_DEADLINE {
            let left = clients.iter().filter(|t| !t.is_finished()).count();
            let log = srv.stderr();
            srv.stop();
            panic!("{left} of {CLIENTS} writes unfinished after {FLOOD_DEADLINE:?}\n--- server stderr ---\n{log}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    for (i, t) in clients.into_iter().enumerate() {
        if t.join().is_err() {
            panic!("client {i} failed\n--- server stderr ---\n{}", srv.stderr());
        }
    }
    let elapsed = began.elapsed();
    srv.assert_alive();
    let hwm = status_bytes(pid, "VmHWM") as usize;
    // The largest request (--max-request 32M) is the size written.
    let overhead = memory_overhead(LIMIT, WRITE, LOOPS, CLIENTS);
    eprintln!(
        "flood: {CLIENTS} clients x {} MiB in {elapsed:.1?}; server RSS idle {} KiB, peak {} KiB; \
         limit {} KiB + documented overhead {} KiB = {} KiB",
        WRITE >> 20,
        idle >> 10,
        hwm >> 10,
        LIMIT >> 10,
        overhead >> 10,
        (LIMIT + overhead) >> 10
    );
    assert!(
        hwm <= LIMIT + overhead,
        "the server's peak RSS {hwm} exceeds --memory-limit {LIMIT} + the documented overhead {overhead}"
    );
    // Not a bound on its own, but a sign the budget did its job: the server never held all of
    // the 2 GiB it was sent, or even a tenth of it.
    assert!(hwm < CLIENTS * WRITE / 10, "peak RSS {hwm}");
}

/// The descriptor numbers a process has open.
fn open_fds(pid: i32) -> BTreeSet<u32> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Lower a running process's descriptor limit (soft and hard) so that exactly `free` more
/// descriptors can be opened: the kernel hands out the lowest free number below the limit.
fn leave_free_descriptors(pid: i32, free: usize) -> u64 {
    let used = open_fds(pid);
    let limit = (0u32..).filter(|n| !used.contains(n)).nth(free - 1).expect("a free number") + 1;
    // util-linux's prlimit(1): no unsafe code in the tests.
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(st.success(), "prlimit: {st}");
    u64::from(limit)
}

/// Has the server sent this client its greeting yet? (Peeks without waiting; consumes nothing.)
fn greeted(s: &UnixStream) -> bool {
    use rustix::net::RecvFlags;
    let mut b = [0u8; 18];
    match rustix::net::recv(s, &mut b, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((n, _)) => n > 0,
        Err(e) => {
            let e = std::io::Error::from(e);
            assert_eq!(e.kind(), ErrorKind::WouldBlock, "peek: {e}");
            false
        }
    }
}

/// Wait (bounded) for `cond` on the server's log.
fn wait_log(srv: &Server, what: &str, timeout: Duration, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = srv.stderr();
        if cond(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n--- server stderr ---\n{log}");
        thread::sleep(Duration::from_millis(20));
    }
}

const PAUSE_WARNING: &str = "pausing new connections until a descriptor frees";

/// The server grows its descriptor table at start-up to its descriptor limit (capped), as
/// `-v` says, instead of doubling it as clients arrive (each doubling in a threaded process
/// waits for an RCU grace period, stalling the accepting loop).
#[test]
fn the_descriptor_table_is_sized_at_start_up() {
    // The server inherits this process's descriptor limit.
    let limit =
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current.expect("a finite limit");
    let want = limit.min(blocksmith_core::io::process::DESCRIPTOR_TABLE_RESERVE);
    let srv = Server::unix(&["-v", "null", "1G"]);
    let log = wait_log(&srv, "the descriptor table line", Duration::from_secs(10), |l| {
        l.contains("descriptor table:")
    });
    assert!(log.contains(&format!("descriptor table: {want} slots reserved")), "{log}");
    // Its table has room for that many before the first client arrives.
    let slots: u64 = status_field(srv.pid(), "FDSize").parse().expect("FDSize is a number");
    assert!(slots >= want, "FDSize {slots}, want at least {want}");
}

#[test]
fn out_of_descriptors_pauses_accepting_once_then_serves_waiting_clients() {
    const FREE: usize = 4;
    const CLIENTS: usize = 12;
    let mut srv = Server::unix(&["-v", "--threads", "2", "null", "1G"]);
    let pid = srv.pid();
    // Let the start-up probe connection close, then leave room for FREE clients only.
    thread::sleep(Duration::from_millis(300));
    let limit = leave_free_descriptors(pid, FREE);

    // More clients than descriptors: the first FREE are accepted, the rest wait in the backlog.
    let mut socks: Vec<Option<UnixStream>> = (0..CLIENTS)
        .map(|_| Some(UnixStream::connect(srv.socket_path()).expect("connect (the backlog holds it)")))
        .collect();
    wait_log(&srv, "the pause warning", Duration::from_secs(10), |l| l.contains(PAUSE_WARNING));
    // Give the server time to greet every client it accepted.
    thread::sleep(Duration::from_millis(500));
    let greeted_now = |s: &Option<UnixStream>| s.as_ref().is_some_and(greeted);
    let served: Vec<usize> = (0..CLIENTS).filter(|&i| greeted_now(&socks[i])).collect();
    assert!(
        !served.is_empty() && served.len() <= FREE + 1 && served.len() < CLIENTS,
        "with {FREE} free descriptors (limit {limit}), {} of {CLIENTS} clients were greeted",
        served.len()
    );

    // Paused, the server does not spin: over a second it uses a small fraction of a CPU.
    let before = cpu_ticks(pid);
    thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(
        used * 4 < clock_ticks_per_second(),
        "the server used {used} ticks of CPU in 1 s while out of descriptors (spinning?)"
    );

    // The clients it has are served normally meanwhile.
    let first = socks[served[0]].take().expect("a served client");
    first.set_read_timeout(Some(raw::IO_TIMEOUT)).expect("timeout");
    let mut c = raw::Conn::new(raw::Stream::Unix(first));
    c.handshake();
    c.request(0, CMD_READ, 7, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 7), "a connected client is served during the shortage");
    assert_eq!(c.recv(4096), vec![0u8; 4096]);
    srv.assert_alive();

    // Clients leave (this one and a second, if there is one): their descriptors free, and
    // waiting clients are taken in their place.
    drop(c);
    if let Some(&i) = served.get(1) {
        socks[i] = None;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        if let Some(i) = (0..CLIENTS).find(|&i| !served.contains(&i) && greeted_now(&socks[i])) {
            break socks[i].take().expect("a waiting client");
        }
        assert!(
            Instant::now() < deadline,
            "no waiting client was greeted after clients left\n--- server stderr ---\n{}",
            srv.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    };
    waiting.set_read_timeout(Some(raw::IO_TIMEOUT)).expect("timeout");
    let mut c = raw::Conn::new(raw::Stream::Unix(waiting));
    c.handshake();
    c.request(0, CMD_READ, 8, 4096, 512);
    assert_eq!(c.simple_reply(), (0, 8), "the client that waited is served");
    assert_eq!(c.recv(512), vec![0u8; 512]);
    srv.assert_alive();

    // Everyone leaves; a newcomer is accepted at once, which ends the shortage.
    drop(c);
    socks.clear();
    let mut c = raw_client(&srv, raw::IO_TIMEOUT);
    c.handshake();
    let log = wait_log(&srv, "the end of the shortage", Duration::from_secs(10), |l| {
        l.contains("descriptors available again")
    });
    srv.assert_alive();
    assert_eq!(
        log.matches(PAUSE_WARNING).count(),
        1,
        "the pause is logged exactly once, whichever loops hit it and however often\n{log}"
    );
}
