//! The one system call the split backend needs beyond std: lseek with SEEK_DATA/SEEK_HOLE,
//! for block status. The only `unsafe` in this module tree.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `lseek(fd, offset, whence)` for SEEK_DATA or SEEK_HOLE. `None` means ENXIO: no data at or
/// after `offset` (SEEK_DATA in the file's final hole).
pub fn seek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let o = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek takes only integers; `f` is borrowed for the call, so its descriptor stays
    // open. The file position it moves is never used: all IO on these files is positional.
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
