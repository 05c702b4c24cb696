//! `cache=none`: a second descriptor on the same file, opened with O_DIRECT.
//!
//! Requests whose offset and length are multiples of the file's O_DIRECT alignment (its
//! logical block size) go through this descriptor, by way of an aligned bounce buffer
//! ([`AlignedBuf`]): reads land in the bounce buffer and are copied into the request's buffer,
//! writes are copied into it first. They bypass the page cache entirely. Everything else
//! (unaligned requests, trim, zero, block status) keeps using the ordinary descriptor, with
//! nbdkit's advisory eviction after each transfer.
//!
//! Where O_DIRECT cannot be had (tmpfs before Linux 6.6, some FUSE and network file systems:
//! the open or the first read fails, or statx says so), the backend says why once and keeps
//! the advisory behaviour for every request.
//!
//! O_DIRECT is not durability: the data may still sit in the device's volatile cache, and the
//! file's metadata (a newly allocated block) may not be on disk, so flush and FUA still run
//! fdatasync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use blocksmith_core::io::aligned::{self, AlignedBuf, DioAlign};

use super::Kind;

/// The alignment assumed when neither statx nor the device says: a page, which every Linux
/// device and file system that does O_DIRECT accepts.
pub const FALLBACK_ALIGN: u64 = 4096;

/// The O_DIRECT descriptor and the alignment its requests need.
pub struct Direct {
    pub file: File,
    /// Offsets and lengths must be multiples of this (a power of two, at most
    /// [`aligned::ALIGN`], which is also the bounce buffers' alignment).
    pub align: u64,
}

/// Whether a request of `len` bytes at `offset` can go through O_DIRECT with this alignment.
/// Empty requests never need to (nor does the kernel want them).
pub fn is_aligned(offset: u64, len: u64, align: u64) -> bool {
    debug_assert!(align.is_power_of_two());
    len > 0 && (offset | len) & (align - 1) == 0
}

/// The alignment to use, from what statx said (`None`: it did not say), the kind of file, and a
/// block device's logical sector size. `Err` says why O_DIRECT is not for this file.
pub fn choose_alignment(statx: Option<DioAlign>, kind: Kind) -> Result<u64, String> {
    let Some(a) = statx else {
        // Older kernels, or file systems that do not fill STATX_DIOALIGN in: the device's
        // sector for a block device (BLKSSZGET), else a page.
        return Ok(match kind {
            Kind::Block { sector } => sector,
            Kind::Regular => FALLBACK_ALIGN,
        });
    };
    if a.mem == 0 || a.offset == 0 {
        return Err("the file system does not support O_DIRECT on this file".into());
    }
    if !a.mem.is_power_of_two() || !a.offset.is_power_of_two() {
        return Err(format!("unusable O_DIRECT alignment (memory {}, offset {})", a.mem, a.offset));
    }
    let limit = aligned::ALIGN as u32;
    if a.mem > limit || a.offset > limit {
        return Err(format!(
            "O_DIRECT needs {} byte alignment of memory and {} of offsets, more than {limit}",
            a.mem, a.offset
        ));
    }
    Ok(u64::from(a.offset))
}

impl Direct {
    /// Open `path` (already open as `buffered`) again with O_DIRECT, and check that a direct
    /// read works. `Err` says why not; the caller then keeps the advisory behaviour. Runs at
    /// configuration time, so it may block.
    pub fn open(
        path: &str,
        buffered: &File,
        writable: bool,
        kind: Kind,
        size: u64,
    ) -> Result<Direct, String> {
        let statx = match aligned::dio_alignment(buffered) {
            Ok(a) => a,
            Err(e) => {
                log::debug!("file: statx STATX_DIOALIGN: {e}");
                None
            }
        };
        let align = choose_alignment(statx, kind)?;
        let mut opts = OpenOptions::new();
        opts.read(true).write(writable).custom_flags(libc::O_DIRECT);
        // Reopen the open file itself through /proc (so a path renamed or replaced since cannot
        // give us another file); without /proc, the path, checked below.
        let file = match opts.open(format!("/proc/self/fd/{}", buffered.as_raw_fd())) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                opts.open(path).map_err(|e| format!("open: {e}"))?
            }
            Err(e) => return Err(format!("open: {e}")),
        };
        let (a, b) =
            (buffered.metadata().map_err(|e| e.to_string())?, file.metadata().map_err(|e| e.to_string())?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(format!("{path} was replaced while it was being opened"));
        }
        let direct = Direct { file, align };
        // Some file systems accept the flag and refuse the IO; find out now, not on a request.
        if size >= align {
            let mut probe = vec![0u8; align as usize];
            direct.read(&mut probe, 0).map_err(|e| format!("probe read: {e}"))?;
        }
        Ok(direct)
    }

    /// Whether a request can go through this descriptor.
    pub fn covers(&self, offset: u64, len: usize) -> bool {
        is_aligned(offset, len as u64, self.align)
    }

    /// Read exactly `buf.len()` bytes at `offset` (aligned) through a bounce buffer. Blocks.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut bounce = AlignedBuf::new(buf.len());
        let n = retry_eintr(|| self.file.read_at(&mut bounce, offset))?;
        if n < buf.len() {
            // A direct read is short only at the end of the file (it shrank), and cannot be
            // continued from an unaligned offset anyway.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&bounce);
        Ok(())
    }

    /// Write all of `data` at `offset` (aligned) through a bounce buffer. Blocks.
    pub fn write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut bounce = AlignedBuf::new(data.len());
        bounce.copy_from_slice(data);
        let n = retry_eintr(|| self.file.write_at(&bounce, offset))?;
        if n < data.len() {
            return Err(io::Error::other("short O_DIRECT write (out of space?)"));
        }
        Ok(())
    }
}

fn retry_eintr(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_decisions() {
        // Both offset and length must be multiples; empty requests never go direct.
        assert!(is_aligned(0, 4096, 4096));
        assert!(is_aligned(8192, 1 << 20, 4096));
        assert!(!is_aligned(512, 4096, 4096));
        assert!(!is_aligned(4096, 512, 4096));
        assert!(!is_aligned(4096, 0, 4096));
        assert!(is_aligned(512, 1024, 512));
        assert!(!is_aligned(511, 1024, 512));
        assert!(!is_aligned(u64::MAX - 4095, 4095, 4096));
    }

    #[test]
    fn alignment_comes_from_statx_then_the_device_then_a_page() {
        let dio = |mem, offset| Some(DioAlign { mem, offset });
        let block = Kind::Block { sector: 512 };
        // statx wins when it answers.
        assert_eq!(choose_alignment(dio(512, 512), Kind::Regular), Ok(512));
        assert_eq!(choose_alignment(dio(4, 4096), block), Ok(4096));
        // Without statx: the device's sector, else a page.
        assert_eq!(choose_alignment(None, block), Ok(512));
        assert_eq!(choose_alignment(None, Kind::Block { sector: 4096 }), Ok(4096));
        assert_eq!(choose_alignment(None, Kind::Regular), Ok(FALLBACK_ALIGN));
        // statx says O_DIRECT is not supported (tmpfs before 6.6 answers zeroes).
        assert!(choose_alignment(dio(0, 0), Kind::Regular).unwrap_err().contains("not support"));
        // More than the bounce buffers' alignment, or nonsense: no O_DIRECT.
        assert!(choose_alignment(dio(8192, 512), Kind::Regular).is_err());
        assert!(choose_alignment(dio(512, 8192), Kind::Regular).is_err());
        assert!(choose_alignment(dio(512, 768), Kind::Regular).is_err());
    }
}
