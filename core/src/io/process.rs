//! Process plumbing: daemonizing, the parent-death signal, fd flags, the descriptor table, the
//! allocator's arenas.
//! Like the rest of `core/src/io/`, the IO-driver code, it may use `unsafe`, each block with
//! the reason it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Put an fd in nonblocking mode (works for sockets and pipes alike).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL on an fd we own takes no pointers; a bad fd is reported
    // as an error, not undefined behaviour.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether two fds refer to the same open file (stdin and stdout being one socket).
pub fn same_file(a: RawFd, b: RawFd) -> bool {
    fn stat(fd: RawFd) -> Option<(u64, u64)> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a full `struct stat` into the buffer we pass on success, and we
        // only read it when it returned 0.
        let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
        if r != 0 {
            return None;
        }
        // SAFETY: fstat succeeded, so the struct is initialised.
        let st = unsafe { st.assume_init() };
        Some((st.st_dev, st.st_ino))
    }
    matches!((stat(a), stat(b)), (Some(x), Some(y)) if x == y)
}

/// The outcome of [`daemonize`] in the calling process.
pub enum Forked {
    /// We are the original process; the child (this pid) serves.
    Parent(i32),
    /// We are the detached child.
    Child,
}

/// Fork into the background as nbdkit does: the parent returns `Parent`, the child starts a new
/// session and points stdin/stdout at /dev/null. Must be called before any thread is started.
pub fn daemonize() -> io::Result<Forked> {
    // SAFETY: the process is still single-threaded here (the caller guarantees it), so the child
    // may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        return Ok(Forked::Parent(pid));
    }
    // SAFETY: setsid takes no arguments; failure is harmless (we are then a process-group leader
    // already).
    unsafe { libc::setsid() };
    let devnull = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    for fd in [0, 1] {
        // SAFETY: dup2 onto the standard fds with a valid source fd we hold open.
        if unsafe { libc::dup2(devnull.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Forked::Child)
}

/// `--exit-with-parent`: ask the kernel to send SIGTERM when the parent dies.
pub fn exit_with_parent() -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes an integer signal number; no pointers are involved.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died before the prctl took effect.
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } == 1 {
        return Err(io::Error::other("parent already exited"));
    }
    Ok(())
}

/// SO_PEERCRED of a Unix socket: the pid, uid and gid of the process that connected. `None`
/// for anything that is not a Unix socket.
pub fn peer_cred(fd: RawFd) -> Option<crate::layer::PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a properly sized and aligned
    // `struct ucred` we own, and updates `len`; a bad or non-socket fd is an error return.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if r != 0 || len as usize != std::mem::size_of::<libc::ucred>() {
        return None;
    }
    Some(crate::layer::PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// The most descriptor slots [`reserve_descriptor_table`] sets up in advance: room for 65,536
/// descriptors costs the kernel about half a megabyte (8 bytes a slot, plus two bitmaps).
pub const DESCRIPTOR_TABLE_RESERVE: u64 = 1 << 16;

/// Grow the process's descriptor table now to the soft `RLIMIT_NOFILE`, at most
/// [`DESCRIPTOR_TABLE_RESERVE`] slots; returns the size asked for.
///
/// Why: the kernel grows the table by doubling when a new descriptor does not fit, and in a
/// process with more than one thread each growth waits for an RCU grace period
/// (`expand_fdtable` calls `synchronize_rcu`), 9–16 ms on these machines, during which the
/// loop that is accepting stands still and every client connecting meanwhile waits: letting
/// in 10,000 clients grew it six times (256 to 16,384 slots) and those stalls were the
/// handshake p99. Grown once at start-up instead, it never grows while serving (tables never
/// shrink). A limit raised later (`prlimit`) grows it the old way past the reserve.
pub fn reserve_descriptor_table() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `struct rlimit` into the value we pass, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let want = lim.rlim_cur.min(DESCRIPTOR_TABLE_RESERVE);
    let lowest = libc::c_int::try_from(want.checked_sub(1)?).ok()?;
    let probe = std::fs::File::open("/dev/null").ok()?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we hold open (`probe`) onto the lowest
    // free number at or above `lowest`; it takes no pointers. The table grows to hold it.
    let high = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, lowest) };
    if high < 0 {
        return None;
    }
    // SAFETY: `high` was just returned by fcntl: a descriptor we own and nothing else refers to.
    drop(unsafe { OwnedFd::from_raw_fd(high) });
    Some(want)
}

/// One glibc malloc arena for all threads (unless the user chose with `MALLOC_ARENA_MAX` or
/// `GLIBC_TUNABLES`): memory a loop frees then serves the next request on any loop, which
/// keeps resident memory near `--memory-limit` (see `bufpool::configure`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn single_malloc_arena() {
    let chosen = |var: &str| std::env::var_os(var).is_some();
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if chosen("MALLOC_ARENA_MAX") || tunables.contains("arena_max") {
        return;
    }
    // SAFETY: mallopt only changes a parameter of glibc's allocator; it takes the allocator's
    // own lock and is safe to call at any time.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if ok != 1 {
        log::debug!("mallopt(M_ARENA_MAX, 1) failed; freed memory stays with each thread's arena");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn single_malloc_arena() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's size is `FDSize` in /proc/self/status.
    fn table_slots() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
        line["FDSize:".len()..].trim().parse().unwrap()
    }

    #[test]
    fn the_descriptor_table_is_grown_in_advance() {
        let want = reserve_descriptor_table().expect("reserve");
        assert!((64..=DESCRIPTOR_TABLE_RESERVE).contains(&want), "{want}");
        assert!(table_slots() >= want, "FDSize {} < {want}", table_slots());
        // Nothing is left open: the next descriptor is a low one.
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!((f.as_raw_fd() as u64) < want - 1);
    }
}
