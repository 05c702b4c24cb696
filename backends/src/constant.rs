//! The layer behind `null`, `ones` and `full`: a disk that stores nothing, so every byte reads
//! the same and block status is one extent. They differ only in that byte, in what block status
//! says, and in whether writes are thrown away or refused; each module keeps its own parameters
//! and tests.

use std::rc::Rc;

use blocksmith_core::error::Errno;
use blocksmith_core::layer::{
    BackendFactory, Done, ExportInfo, Extents, Flags, Layer, OpenCx, Support, EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::NbdError;

/// What happens to writes, trims and zeroes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Writes {
    /// Accepted and thrown away; flush and FUA succeed at once (nothing is kept to flush).
    Discarded,
    /// Refused with ENOSPC, naming the backend. No flush, so no FUA either (nbdkit's `full`).
    NoSpace(&'static str),
}

/// One configured constant disk; also its own factory (every connection sees the same).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Constant {
    pub size: u64,
    /// What every read returns.
    pub byte: u8,
    /// True: block status says hole+zero; false: data (`ones`, even with byte=0, as nbdkit).
    pub hole: bool,
    pub writes: Writes,
}

impl BackendFactory for Constant {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(*self))
    }
}

impl Constant {
    fn write_result(&self) -> Result<(), NbdError> {
        match self.writes {
            Writes::Discarded => Ok(()),
            Writes::NoSpace(name) => Err(NbdError::msg(Errno::NoSpc, format!("{name}: the disk is full"))),
        }
    }
}

impl Layer for Constant {
    fn info(&self) -> ExportInfo {
        let discarded = matches!(self.writes, Writes::Discarded);
        ExportInfo {
            // Writable even when full, so clients try to write and get ENOSPC rather than EPERM.
            can_write: true,
            can_flush: discarded,
            fua: if discarded { Support::Native } else { Support::None },
            can_trim: true,
            zero: Support::Native,
            // A full disk leaves FAST_ZERO to the shim, which refuses it with ENOTSUP before the
            // ENOSPC a plain zero gets (as nbdkit's full plugin).
            can_fast_zero: discarded,
            can_extents: true,
            cache: Support::Native,
            ..ExportInfo::read_only(self.size)
        }
    }

    fn pread(&self, mut buf: Vec<u8>, _offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        buf.fill(self.byte);
        done.ok(buf)
    }

    fn pwrite(&self, _data: Vec<u8>, _offset: u64, _flags: Flags, done: Done<()>) {
        done.call(self.write_result())
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        done.ok(())
    }

    fn trim(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.call(self.write_result())
    }

    fn zero(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.call(self.write_result())
    }

    fn extents(&self, count: u64, _offset: u64, _flags: Flags, done: Done<Extents>) {
        let mut e = Extents::new();
        e.push(count, if self.hole { EXTENT_HOLE | EXTENT_ZERO } else { 0 });
        done.ok(e)
    }

    fn cache(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
    }
}
