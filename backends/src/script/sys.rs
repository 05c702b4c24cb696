//! The few system calls the script backends need beyond std, each wrapped once. The only place
//! in the script machinery allowed `unsafe`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn check(r: libc::c_int) -> io::Result<()> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn pid_t(pid: u32) -> io::Result<libc::pid_t> {
    // A pid of 0 or one that does not fit would address a whole process group or every process.
    match libc::pid_t::try_from(pid) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(io::Error::from_raw_os_error(libc::ESRCH)),
    }
}

/// A pidfd for our child `pid`: readable once the child has exited (Linux >= 5.3). The child is
/// not reaped by this; `Child::try_wait` still does that.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let p = pid_t(pid)?;
    // SAFETY: pidfd_open takes a pid and a flags word, no pointers. On success it returns a new
    // descriptor (close-on-exec) that nothing else owns.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0 as libc::c_uint) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send SIGKILL to the process group `pgid` (children run in their own group, with the child's
/// pid as its id, so this also reaches whatever the script started).
pub fn kill_group(pgid: u32) -> io::Result<()> {
    let p = pid_t(pgid)?;
    // SAFETY: kill takes integers only; `-p` with p > 0 names exactly one process group.
    check(unsafe { libc::kill(-p, libc::SIGKILL) })
}

/// flock(2) on an open file or directory.
pub fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock takes integers only; `f` keeps the descriptor open for the call.
    check(unsafe { libc::flock(f.as_raw_fd(), op) })
}

/// poll(2) on `fds` for at most `timeout_ms` (-1: forever). Returns how many have events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the pointer and length describe `fds`, a live, exclusively borrowed slice of
    // pollfd structs that poll only reads and writes within.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}
