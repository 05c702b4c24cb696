//! The system calls the file backend needs beyond std, each checked and wrapped once. The only
//! place in the file backend allowed `unsafe` (the O_DIRECT and RWF_NOWAIT calls live in the
//! core's IO driver, `blocksmith_core::io`).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// Block-layer ioctls libc does not name. Each is _IO(0x12, nr); deriving them from
// BLKSSZGET = _IO(0x12, 104) carries over the architecture's _IO encoding, which is not the
// same everywhere (mips, powerpc and sparc put a direction bit in it).
pub const BLKDISCARD: libc::Ioctl = libc::BLKSSZGET + (119 - 104);
pub const BLKROTATIONAL: libc::Ioctl = libc::BLKSSZGET + (126 - 104);
pub const BLKZEROOUT: libc::Ioctl = libc::BLKSSZGET + (127 - 104);

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: fallocate takes only integers; the descriptor belongs to `f`, which is borrowed
    // for the duration of the call and so stays open.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, o, l) })
}

/// lseek with SEEK_DATA or SEEK_HOLE. `None` means ENXIO: no data at or after `offset`.
pub fn seek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let o = off(offset)?;
    // SAFETY: lseek takes only integers; `f` keeps the descriptor open during the call. The
    // file position it moves is never used (all IO is positional).
    let r = unsafe { libc::lseek(f.as_raw_fd(), o, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

pub fn fadvise(f: &File, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: posix_fadvise takes only integers; `f` keeps the descriptor open. It returns
    // the error number instead of setting errno.
    match unsafe { libc::posix_fadvise(f.as_raw_fd(), o, l, advice) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

pub fn sync_file_range(f: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: sync_file_range takes only integers; `f` keeps the descriptor open.
    check(unsafe { libc::sync_file_range(f.as_raw_fd(), o, l, flags) })
}

/// BLKDISCARD or BLKZEROOUT over `[offset, offset + len)`.
pub fn block_range(f: &File, request: libc::Ioctl, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: both ioctls read a `uint64_t[2]` {start, length} through the pointer, which
    // points at `range`, alive and correctly sized until the call returns.
    check(unsafe { libc::ioctl(f.as_raw_fd(), request, range.as_ptr()) })
}

/// The logical sector size of a block device (BLKSSZGET).
pub fn sector_size(f: &File) -> io::Result<u64> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `size`.
    check(unsafe { libc::ioctl(f.as_raw_fd(), libc::BLKSSZGET, &mut size as *mut libc::c_int) })?;
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad sector size"))
}

/// Whether a block device is rotational (BLKROTATIONAL).
pub fn rotational(f: &File) -> io::Result<bool> {
    let mut rot: libc::c_ushort = 0;
    // SAFETY: BLKROTATIONAL writes one `unsigned short` through the pointer, which points at
    // `rot`.
    check(unsafe { libc::ioctl(f.as_raw_fd(), BLKROTATIONAL, &mut rot as *mut libc::c_ushort) })?;
    Ok(rot != 0)
}

/// "This file system or device cannot do that" (ENODEV is what old kernels said for
/// fallocate on block devices; ENOTSUP is the same value as EOPNOTSUPP on Linux).
pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENODEV | libc::ENOTTY))
}

/// Whether the file's pages live in memory for good: on ramfs, or on tmpfs while no swap is
/// active (`/proc/swaps` lists none), so reading it can never wait for a disk.
pub fn memory_resident(f: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the statfs we point it at, which lives across the call; `f` keeps
    // the descriptor open.
    if unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's integer type differs between architectures
    let kind = st.f_type as i64;
    match kind {
        RAMFS_MAGIC => true,
        TMPFS_MAGIC => std::fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() <= 1),
        _ => false,
    }
}

/// Whether every page of `[offset, offset + len)` is in the page cache (`cachestat(2)`, Linux
/// 6.5 and later): then sending it cannot wait for a disk. `None` where the kernel cannot tell.
pub fn all_cached(f: &File, offset: u64, len: u64) -> Option<bool> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // cachestat's number in the generic syscall table, which x86_64 and aarch64 share.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const SYS_CACHESTAT: libc::c_long = 451;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return None;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        if len == 0 {
            return Some(true);
        }
        let range = Range { off: offset, len };
        let mut st = Stat::default();
        // SAFETY: cachestat reads `range` and writes `st`, both live and of the kernel's layout
        // (struct cachestat_range, struct cachestat); flags must be 0. `f` keeps the fd open.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut Stat,
                0 as libc::c_uint,
            )
        };
        if r != 0 {
            return None;
        }
        const PAGE: u64 = 4096;
        let pages = (offset + len).div_ceil(PAGE) - offset / PAGE;
        Some(st.nr_cache >= pages)
    }
}
