//! The validating shim that sits above every layer (nbdkit's `backend.c`).
//!
//! It asks its layer for `ExportInfo` once, then for every call: checks the range against the
//! size, checks flags and capabilities (read-only → EPERM, write past the end → ENOSPC, other
//! bad ranges → EINVAL, a flag the layer cannot honour → EINVAL), and emulates what the layer
//! does not do natively — FUA by a flush after the write, WRITE_ZEROES by writing zeroes, CACHE
//! by reading and discarding, block status as "all data" — so layers never repeat these checks
//! and emulation happens in exactly one place.

use std::rc::Rc;

use super::{Done, ExportInfo, Extents, Flags, Layer, ReadData, Support};
use crate::error::{Errno, NbdError};

/// Largest buffer the shim allocates at once when it emulates zero or cache.
const EMULATION_CHUNK: u64 = 1024 * 1024;

pub struct Shim {
    inner: Rc<dyn Layer>,
    /// What the inner layer reported (the truth about what it can do).
    below: ExportInfo,
    /// What the layer above is told (after read-only and emulation are applied).
    above: ExportInfo,
}

impl Shim {
    /// Wrap `inner`. `force_readonly` is the server's `-r`, or a filter's decision.
    pub fn new(inner: Rc<dyn Layer>, force_readonly: bool) -> Rc<Shim> {
        let below = inner.info();
        let above = effective_info(&below, force_readonly);
        Rc::new(Shim { inner, below, above })
    }

    fn check_range(&self, count: u64, offset: u64, past_end: Errno) -> Result<(), NbdError> {
        match offset.checked_add(count) {
            Some(end) if end <= self.above.size => Ok(()),
            _ => Err(NbdError::msg(
                past_end,
                format!("request out of range: offset {offset} + count {count} > size {}", self.above.size),
            )),
        }
    }

    fn check_writable(&self) -> Result<(), NbdError> {
        if self.above.can_write {
            Ok(())
        } else {
            Err(NbdError::msg(Errno::Perm, "export is read-only"))
        }
    }

    fn check_fua(&self, flags: Flags) -> Result<(), NbdError> {
        if flags.contains(Flags::FUA) && self.above.fua == Support::None {
            Err(NbdError::inval("FUA is not supported"))
        } else {
            Ok(())
        }
    }

    /// Pass FUA down if the layer does it natively; otherwise strip it and flush afterwards.
    fn with_fua(&self, flags: Flags, done: Done<()>) -> (Flags, Done<()>) {
        if !flags.contains(Flags::FUA) || self.below.fua == Support::Native {
            return (flags, done);
        }
        let inner = self.inner.clone();
        let done = Done::new(move |r: Result<(), NbdError>| match r {
            Ok(()) => inner.flush(Flags::NONE, done),
            Err(e) => done.err(e),
        });
        (flags.without(Flags::FUA), done)
    }
}

/// What a layer above sees, given what the layer below can do.
fn effective_info(below: &ExportInfo, force_readonly: bool) -> ExportInfo {
    let mut i = below.clone();
    i.can_write = below.can_write && !force_readonly;
    if !i.can_write {
        i.can_trim = false;
        i.zero = Support::None;
        i.can_fast_zero = false;
        i.fua = Support::None;
    }
    // What this shim emulates, the layer above may call as if it were native: it must not
    // emulate it again (a zero would otherwise reach a filter above as a stream of writes).
    i.fua = match i.fua {
        Support::Emulate if below.can_flush => Support::Native,
        Support::Emulate => Support::None,
        other => other,
    };
    if i.zero != Support::None {
        i.zero = Support::Native;
        // A zero that is emulated is never fast: advertise FAST_ZERO anyway and fail it with
        // ENOTSUP, as nbdkit does, so clients like qemu-img learn quickly that zeroing is slow.
        i.can_fast_zero = true;
    }
    if i.cache == Support::Emulate {
        i.cache = Support::Native;
    }
    i
}

impl Layer for Shim {
    fn info(&self) -> ExportInfo {
        self.above.clone()
    }

    fn pread(&self, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        if let Err(e) = self.check_range(buf.len() as u64, offset, Errno::Inval) {
            return done.err(e);
        }
        if buf.is_empty() {
            return done.ok(buf);
        }
        // FUA on a read is meaningless and ignored, as qemu and nbdkit do.
        self.inner.pread(buf, offset, Flags::NONE, done)
    }

    fn pread_lent(&self, count: usize, offset: u64, _flags: Flags, done: Done<ReadData>) {
        if let Err(e) = self.check_range(count as u64, offset, Errno::Inval) {
            return done.err(e);
        }
        if count == 0 {
            return done.ok(ReadData::Buf(Vec::new()));
        }
        self.inner.pread_lent(count, offset, Flags::NONE, done)
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let check = self
            .check_writable()
            .and_then(|_| self.check_range(data.len() as u64, offset, Errno::NoSpc))
            .and_then(|_| self.check_fua(flags));
        if let Err(e) = check {
            return done.err(e);
        }
        if data.is_empty() {
            return done.ok(());
        }
        let (flags, done) = self.with_fua(flags, done);
        self.inner.pwrite(data, offset, flags, done)
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        if !self.above.can_flush {
            return done.err(NbdError::inval("flush is not supported"));
        }
        self.inner.flush(Flags::NONE, done)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let check = self
            .check_writable()
            .and_then(|_| {
                if self.above.can_trim {
                    Ok(())
                } else {
                    Err(NbdError::inval("trim is not supported"))
                }
            })
            .and_then(|_| self.check_range(count, offset, Errno::Inval))
            .and_then(|_| self.check_fua(flags));
        if let Err(e) = check {
            return done.err(e);
        }
        if count == 0 {
            return done.ok(());
        }
        let (flags, done) = self.with_fua(flags, done);
        self.inner.trim(count, offset, flags, done)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let check = self
            .check_writable()
            .and_then(|_| {
                if self.above.zero != Support::None {
                    Ok(())
                } else {
                    Err(NbdError::inval("write zeroes is not supported"))
                }
            })
            .and_then(|_| self.check_range(count, offset, Errno::NoSpc))
            .and_then(|_| self.check_fua(flags));
        if let Err(e) = check {
            return done.err(e);
        }
        let native = self.below.zero == Support::Native;
        if flags.contains(Flags::FAST_ZERO) && !(native && self.below.can_fast_zero) {
            return done.err(NbdError::msg(Errno::NotSup, "fast zero is not supported"));
        }
        if count == 0 {
            return done.ok(());
        }
        let (flags, done) = self.with_fua(flags, done);
        if native {
            // A layer that cannot trim cannot punch a hole while zeroing either.
            let flags = if self.below.can_trim { flags } else { flags.without(Flags::MAY_TRIM) };
            self.inner.zero(count, offset, flags, done)
        } else {
            emulate_zero(self.inner.clone(), count, offset, flags.without(Flags::MAY_TRIM), done)
        }
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        if count == 0 {
            return done.err(NbdError::inval("block status of zero length"));
        }
        if let Err(e) = self.check_range(count, offset, Errno::Inval) {
            return done.err(e);
        }
        if !self.below.can_extents {
            let mut e = Extents::new();
            e.push(count, 0);
            return done.ok(e);
        }
        let req_one = flags.contains(Flags::REQ_ONE);
        let limit = self.above.size - offset;
        self.inner.extents(
            count,
            offset,
            flags,
            done.map(move |r: Result<Extents, NbdError>| r.map(|e| clip_extents(e, count, limit, req_one))),
        )
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        if let Err(e) = self.check_range(count, offset, Errno::Inval) {
            return done.err(e);
        }
        match self.below.cache {
            _ if count == 0 => done.ok(()),
            Support::Native => self.inner.cache(count, offset, Flags::NONE, done),
            Support::Emulate => emulate_cache(self.inner.clone(), count, offset, done),
            // Nothing to prefetch into: success promises nothing, so succeed.
            Support::None => done.ok(()),
        }
    }

    fn close(&self) {
        self.inner.close()
    }
}

/// Make a layer's block-status answer well formed: no zero-length extents, nothing past the end
/// of the export, never empty, one extent for REQ_ONE (not longer than asked), and at most the
/// spec's descriptor limit.
fn clip_extents(e: Extents, count: u64, limit: u64, req_one: bool) -> Extents {
    let mut out = Extents::new();
    let mut covered = 0u64;
    for x in e.0 {
        if covered >= limit || covered >= count || out.0.len() >= crate::limits::MAX_EXTENTS_PER_REPLY {
            break;
        }
        let len = x.length.min(limit - covered);
        if len == 0 {
            continue;
        }
        out.push(len, x.flags);
        covered += len;
        if req_one {
            break;
        }
    }
    if out.0.is_empty() {
        out.push(count.min(limit), 0);
    }
    if req_one {
        out.0.truncate(1);
        if out.0[0].length > count {
            out.0[0].length = count;
        }
    }
    out
}

/// WRITE_ZEROES for a layer without it: write buffers of zeroes, one chunk at a time.
fn emulate_zero(inner: Rc<dyn Layer>, count: u64, offset: u64, flags: Flags, done: Done<()>) {
    let n = count.min(EMULATION_CHUNK);
    let rest = count - n;
    // FUA (if native) goes on the last chunk only.
    let chunk_flags = if rest == 0 { flags } else { flags.without(Flags::FUA) };
    let next = inner.clone();
    inner.pwrite(
        vec![0u8; n as usize],
        offset,
        chunk_flags,
        Done::new(move |r: Result<(), NbdError>| match r {
            Ok(()) if rest > 0 => emulate_zero(next, rest, offset + n, flags, done),
            other => done.call(other),
        }),
    );
}

/// CACHE for a layer that asks for emulation: read the range and drop the data.
fn emulate_cache(inner: Rc<dyn Layer>, count: u64, offset: u64, done: Done<()>) {
    let n = count.min(EMULATION_CHUNK);
    let rest = count - n;
    let next = inner.clone();
    inner.pread(
        vec![0u8; n as usize],
        offset,
        Flags::NONE,
        Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
            Ok(_) if rest > 0 => emulate_cache(next, rest, offset + n, done),
            Ok(_) => done.ok(()),
            Err(e) => done.err(e),
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Extent;
    use std::cell::RefCell;

    /// A tiny in-memory layer recording calls.
    struct Ram {
        data: RefCell<Vec<u8>>,
        calls: RefCell<Vec<String>>,
        info: ExportInfo,
    }

    impl Layer for Ram {
        fn info(&self) -> ExportInfo {
            self.info.clone()
        }
        fn pread(&self, mut buf: Vec<u8>, offset: u64, _f: Flags, done: Done<Vec<u8>>) {
            let o = offset as usize;
            let n = buf.len();
            buf.copy_from_slice(&self.data.borrow()[o..o + n]);
            self.calls.borrow_mut().push(format!("pread {} {}", buf.len(), offset));
            done.ok(buf)
        }
        fn pwrite(&self, data: Vec<u8>, offset: u64, f: Flags, done: Done<()>) {
            let o = offset as usize;
            self.data.borrow_mut()[o..o + data.len()].copy_from_slice(&data);
            self.calls.borrow_mut().push(format!("pwrite {} {} {}", data.len(), offset, f.bits()));
            done.ok(())
        }
        fn flush(&self, _f: Flags, done: Done<()>) {
            self.calls.borrow_mut().push("flush".into());
            done.ok(())
        }
        fn extents(&self, _c: u64, _o: u64, _f: Flags, done: Done<Extents>) {
            done.ok(Extents(vec![
                Extent { length: 0, flags: 3 },
                Extent { length: 4096, flags: 3 },
                Extent { length: 1 << 40, flags: 0 },
            ]))
        }
    }

    fn ram(size: usize) -> Rc<Ram> {
        let mut info = ExportInfo::read_only(size as u64);
        info.can_write = true;
        info.can_flush = true;
        info.fua = Support::Emulate;
        info.zero = Support::Emulate;
        info.can_extents = true;
        Rc::new(Ram { data: RefCell::new(vec![1u8; size]), calls: RefCell::default(), info })
    }

    fn result<T: 'static>(f: impl FnOnce(Done<T>)) -> Result<T, NbdError> {
        let out = Rc::new(RefCell::new(None));
        let o = out.clone();
        f(Done::new(move |r| *o.borrow_mut() = Some(r)));
        let r = out.borrow_mut().take();
        r.expect("completed synchronously")
    }

    #[test]
    fn ranges_and_errnos() {
        let r = ram(8192);
        let s = Shim::new(r.clone(), false);
        assert_eq!(result(|d| s.pread(vec![0; 10], 8190, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        assert_eq!(
            result(|d| s.pread(vec![0; 1], u64::MAX, Flags::NONE, d)).unwrap_err().errno,
            Errno::Inval
        );
        assert_eq!(result(|d| s.pwrite(vec![0; 10], 8190, Flags::NONE, d)).unwrap_err().errno, Errno::NoSpc);
        assert_eq!(result(|d| s.zero(10, 8190, Flags::NONE, d)).unwrap_err().errno, Errno::NoSpc);
        assert_eq!(result(|d| s.trim(1, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        let ro = Shim::new(r, true);
        assert_eq!(result(|d| ro.pwrite(vec![0; 1], 0, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
        assert!(!ro.info().can_write);
    }

    #[test]
    fn fua_is_emulated_by_flush_and_zero_by_write() {
        let r = ram(8192);
        let s = Shim::new(r.clone(), false);
        result(|d| s.pwrite(vec![7; 4], 0, Flags::FUA, d)).unwrap();
        assert_eq!(*r.calls.borrow(), vec!["pwrite 4 0 0".to_string(), "flush".to_string()]);
        result(|d| s.zero(4, 2, Flags::MAY_TRIM, d)).unwrap();
        assert_eq!(&r.data.borrow()[..8], &[7, 7, 0, 0, 0, 0, 1, 1]);
        let e = result(|d| s.zero(4, 0, Flags::FAST_ZERO, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        assert!(s.info().can_fast_zero);
    }

    #[test]
    fn extents_are_clipped() {
        let s = Shim::new(ram(8192), false);
        let e = result(|d| s.extents(8192, 0, Flags::NONE, d)).unwrap();
        assert_eq!(e.0, vec![Extent { length: 4096, flags: 3 }, Extent { length: 4096, flags: 0 }]);
        let e = result(|d| s.extents(100, 0, Flags::REQ_ONE, d)).unwrap();
        assert_eq!(e.0, vec![Extent { length: 100, flags: 3 }]);
        assert_eq!(result(|d| s.extents(0, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
    }
}
