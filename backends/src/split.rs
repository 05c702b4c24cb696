//! `split`: several files concatenated into one disk (nbdkit-split-plugin).
//!
//! The files are named by repeated `file=` parameters and opened once, at configuration time
//! (read-write if possible, else read-only, which makes the export read-only), so a missing file
//! stops the server at start-up. Their sizes are measured when each connection opens, as nbdkit
//! does; they must not change while a client is connected.
//!
//! Every read, write, flush and block-status request runs on the blocking pool; a request that
//! straddles files becomes one pool job that does each piece in turn.
//!
//! Differences from nbdkit 1.32, on purpose: nbdkit writes a piece that falls in the second or a
//! later file at the disk offset instead of the offset within that file (corrupting the files);
//! we write where the data belongs. nbdkit has no flush; ours syncs every file, FUA is a flush
//! after the write, and since all connections share the same descriptors (and a flush syncs
//! them all) multi-conn is advertised.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec, Support,
    EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::sched::Sched;
use blocksmith_core::{ConfigError, NbdError};

const NAME: &str = "split";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "several files concatenated into one disk (nbdkit-split-plugin)",
    magic: Some("file"),
    params: &[ParamSpec {
        name: "file",
        help: "(required, repeatable) A regular file; the files are concatenated in the order given.\n\
               Opened read-write if possible; if any is read-only, so is the export.",
    }],
    make,
};

/// SEEK_DATA/SEEK_HOLE pairs one block-status request may make, across all files. Less than
/// asked is a valid answer.
const MAX_SEEK_STEPS: usize = 1024;

/// An IO error for the wire, naming the operation but not the path (messages reach clients).
fn io_error(op: &str, e: &io::Error) -> NbdError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return NbdError::io(format!("{op}: unexpected end of file"));
    }
    let mut n = NbdError::from_io(e);
    n.message = Some(format!("{op}: {e}"));
    n
}

/// The files, shared by every connection and pool thread (all IO is positional).
struct Shared {
    files: Vec<File>,
    writable: bool,
}

/// Where each file sits in the disk, as measured when a connection opened.
struct Map {
    starts: Vec<u64>,
    sizes: Vec<u64>,
    /// Whether SEEK_DATA works on each file (else its range is reported as data).
    seekable: Vec<bool>,
    size: u64,
}

/// One contiguous piece of a request: `n` bytes of file `file` from `foff`, at `at` in the
/// request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    file: usize,
    foff: u64,
    at: u64,
    n: u64,
}

impl Map {
    /// Split `[offset, offset + len)` (within the disk) by file. Empty files take no space and
    /// are skipped.
    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        // The first file that ends after `offset`.
        let mut i = self.starts.iter().zip(&self.sizes).take_while(|(s, z)| *s + *z <= offset).count();
        let mut at = 0;
        while at < len && i < self.sizes.len() {
            let pos = offset + at;
            let foff = pos - self.starts[i];
            let n = (self.sizes[i] - foff).min(len - at);
            if n > 0 {
                out.push(Piece { file: i, foff, at, n });
            }
            at += n;
            i += 1;
        }
        out
    }
}

impl Shared {
    /// Measure the files (per connection, as nbdkit does).
    fn measure(&self) -> Result<Map, NbdError> {
        let mut map = Map { starts: vec![], sizes: vec![], seekable: vec![], size: 0 };
        for f in &self.files {
            let len = f.metadata().map_err(|e| io_error("fstat", &e))?.len();
            map.starts.push(map.size);
            map.sizes.push(len);
            map.seekable.push(crate::file::sys::seek(f, 0, libc::SEEK_DATA).is_ok());
            map.size =
                map.size.checked_add(len).filter(|&s| s <= i64::MAX as u64).ok_or_else(|| {
                    NbdError::io(format!("{NAME}: the files add up to more than 2^63-1 bytes"))
                })?;
        }
        Ok(map)
    }

    fn read(&self, map: &Map, mut buf: Vec<u8>, offset: u64) -> Result<Vec<u8>, NbdError> {
        for p in map.pieces(offset, buf.len() as u64) {
            let dst = &mut buf[p.at as usize..(p.at + p.n) as usize];
            self.files[p.file].read_exact_at(dst, p.foff).map_err(|e| io_error("pread", &e))?;
        }
        Ok(buf)
    }

    fn write(&self, map: &Map, data: &[u8], offset: u64) -> Result<(), NbdError> {
        for p in map.pieces(offset, data.len() as u64) {
            let src = &data[p.at as usize..(p.at + p.n) as usize];
            self.files[p.file].write_all_at(src, p.foff).map_err(|e| io_error("pwrite", &e))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), NbdError> {
        for f in &self.files {
            f.sync_data().map_err(|e| io_error("fdatasync", &e))?;
        }
        Ok(())
    }

    /// Holes and data from SEEK_DATA/SEEK_HOLE, file by file.
    fn extents(&self, map: &Map, count: u64, offset: u64, req_one: bool) -> Result<Extents, NbdError> {
        let mut e = Extents::new();
        let mut steps = 0;
        for p in map.pieces(offset, count) {
            if !map.seekable[p.file] {
                e.push(p.n, 0);
            } else {
                let f = &self.files[p.file];
                let end = p.foff + p.n;
                let mut pos = p.foff;
                while pos < end && steps < MAX_SEEK_STEPS {
                    steps += 1;
                    let data = crate::file::sys::seek(f, pos, libc::SEEK_DATA)
                        .map_err(|e| io_error("lseek SEEK_DATA", &e))?
                        .map_or(end, |d| d.min(end));
                    if data > pos {
                        e.push(data - pos, EXTENT_HOLE | EXTENT_ZERO);
                        pos = data;
                        if req_one {
                            break;
                        }
                    }
                    if pos >= end {
                        break;
                    }
                    let hole = crate::file::sys::seek(f, pos, libc::SEEK_HOLE)
                        .map_err(|e| io_error("lseek SEEK_HOLE", &e))?
                        .map_or(end, |h| h.min(end));
                    if hole > pos {
                        e.push(hole - pos, 0);
                        pos = hole;
                        if req_one {
                            break;
                        }
                    }
                }
                // Stopped early: what is described so far is the answer.
                if pos < end {
                    break;
                }
            }
            if req_one || steps >= MAX_SEEK_STEPS {
                break;
            }
        }
        if e.0.is_empty() {
            // Only if a file changed under every seek: "data" is always a true answer.
            e.push(count, 0);
        }
        Ok(e)
    }
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let err = |m: String| ConfigError::new(format!("{NAME}: {m}"));
    let paths = params.take_all("file");
    params.finish(NAME)?;
    if paths.is_empty() {
        return Err(err("at least one file= is required".into()));
    }
    let mut files = Vec::with_capacity(paths.len());
    let mut writable = true;
    for path in &paths {
        // Checked before opening: opening a FIFO could block start-up.
        let meta = std::fs::metadata(path).map_err(|e| err(format!("{path}: {e}")))?;
        if !meta.is_file() {
            return Err(err(format!("{path} is not a regular file")));
        }
        let f = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) => {
                log::debug!("{NAME}: cannot open {path} read-write ({e}): the export is read-only");
                writable = false;
                File::open(path).map_err(|e| err(format!("cannot open {path}: {e}")))?
            }
        };
        if !f.metadata().map_err(|e| err(format!("{path}: {e}")))?.is_file() {
            return Err(err(format!("{path} is not a regular file")));
        }
        files.push(f);
    }
    Ok(Arc::new(SplitFactory { shared: Arc::new(Shared { files, writable }) }))
}

struct SplitFactory {
    shared: Arc<Shared>,
}

impl BackendFactory for SplitFactory {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        let shared = self.shared.clone();
        let measure = self.shared.clone();
        let sched = cx.sched.clone();
        let can_write = self.shared.writable && !cx.readonly;
        cx.sched.blocking(
            move || measure.measure(),
            move |r: Result<Map, NbdError>| match r {
                Ok(map) => done.ok(Rc::new(SplitLayer { shared, map: Arc::new(map), sched, can_write })),
                Err(e) => done.err(e),
            },
        );
    }
}

struct SplitLayer {
    shared: Arc<Shared>,
    map: Arc<Map>,
    sched: Sched,
    can_write: bool,
}

impl SplitLayer {
    /// Run `work` on the blocking pool; its result completes `done` back on this loop.
    fn offload<T: Send + 'static>(
        &self,
        done: Done<T>,
        work: impl FnOnce(&Shared, &Map) -> Result<T, NbdError> + Send + 'static,
    ) {
        let shared = self.shared.clone();
        let map = self.map.clone();
        self.sched.blocking(move || work(&shared, &map), move |r| done.call(r));
    }
}

impl Layer for SplitLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            can_write: self.can_write,
            can_flush: true,
            fua: Support::Emulate,
            zero: Support::Emulate,
            can_extents: self.map.seekable.iter().any(|&s| s),
            // Reading ahead through the page cache is what nbdkit's fadvise asks for too.
            cache: Support::Emulate,
            can_multi_conn: true,
            ..ExportInfo::read_only(self.map.size)
        }
    }

    fn pread(&self, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        self.offload(done, move |sh, map| sh.read(map, buf, offset))
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        self.offload(done, move |sh, map| sh.write(map, &data, offset))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        self.offload(done, |sh, _| sh.flush())
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let req_one = flags.contains(Flags::REQ_ONE);
        self.offload(done, move |sh, map| sh.extents(map, count, offset, req_one))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};
    use blocksmith_core::error::Errno;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const HZ: u32 = EXTENT_HOLE | EXTENT_ZERO;

    /// Files in a fresh directory, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!("bs-split-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
            let p = std::env::temp_dir().join(name);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn file(&self, name: &str, data: &[u8]) -> String {
            let p = self.0.join(name);
            std::fs::write(&p, data).unwrap();
            p.to_str().unwrap().to_string()
        }
        fn read(&self, name: &str) -> Vec<u8> {
            std::fs::read(self.0.join(name)).unwrap()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn concatenates_and_writes_in_place() {
        let d = Dir::new();
        let (a, b, c) = (pattern(1000, 1), pattern(3000, 2), pattern(10, 3));
        let files = [d.file("a", &a), d.file("empty", b""), d.file("b", &b), d.file("c", &c)];
        let kv: Vec<_> = files.iter().map(|f| ("file", f.as_str())).collect();
        let conn = open(make(&SPEC, &kv).unwrap(), false);
        let i = conn.info();
        assert_eq!(i.size, 4010);
        assert!(i.can_write && i.can_flush && i.can_multi_conn && !i.can_trim);
        let all = [a.clone(), b.clone(), c.clone()].concat();
        assert_eq!(conn.read(4010, 0).unwrap(), all);
        assert_eq!(conn.read(20, 990).unwrap(), &all[990..1010]);
        // A write across all three files lands at the right place in each (nbdkit 1.32 would
        // write the second and third pieces at the disk offset instead).
        conn.write(&[0xee; 3100], 900, Flags::FUA).unwrap();
        let mut want = all.clone();
        want[900..4000].fill(0xee);
        assert_eq!(conn.read(4010, 0).unwrap(), want);
        assert_eq!(d.read("a"), &want[..1000]);
        assert_eq!(d.read("b"), &want[1000..4000]);
        assert_eq!(d.read("c"), &want[4000..]);
        assert_eq!(d.read("empty"), b"");
        conn.zero(5, 4005, Flags::NONE).unwrap();
        assert_eq!(d.read("c"), [&c[..5], &[0; 5]].concat());
        conn.flush().unwrap();
        conn.cache(4010, 0).unwrap();
        // Past the end is refused by the shim; the files never grow.
        assert_eq!(conn.write(b"x", 4010, Flags::NONE).unwrap_err().errno, Errno::NoSpc);
        assert_eq!(std::fs::metadata(&files[3]).unwrap().len(), 10);
        // Read-only connections.
        let ro = open(make(&SPEC, &kv).unwrap(), true);
        assert_eq!(ro.write(b"x", 0, Flags::NONE).unwrap_err().errno, Errno::Perm);
    }

    #[test]
    fn extents_per_file() {
        let d = Dir::new();
        let a = d.file("a", &[1; 8192]);
        // A sparse file: a hole, then data in its last block.
        let b = d.0.join("b");
        let f = File::create(&b).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[7; 4096], (1 << 20) - 4096).unwrap();
        drop(f);
        let conn = open(make(&SPEC, &[("file", &a), ("file", b.to_str().unwrap())]).unwrap(), false);
        let size = 8192 + (1 << 20);
        let e = conn.extents(size, 0, Flags::NONE).unwrap();
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), size);
        assert_eq!(e[0], (8192, 0));
        // Some file systems (tmpfs, ext4, xfs) report the hole; all report the data at the end.
        assert_eq!(e.last().unwrap().1, 0);
        if e.len() == 3 {
            assert_eq!(e[1], ((1 << 20) - 4096, HZ));
        }
        assert_eq!(conn.extents(size - 100, 100, Flags::REQ_ONE).unwrap(), vec![(8092, 0)]);
    }

    #[test]
    fn pieces_skip_empty_files() {
        let m = Map {
            starts: vec![0, 10, 10, 30],
            sizes: vec![10, 0, 20, 5],
            seekable: vec![false; 4],
            size: 35,
        };
        let p = |file, foff, at, n| Piece { file, foff, at, n };
        assert_eq!(m.pieces(0, 35), vec![p(0, 0, 0, 10), p(2, 0, 10, 20), p(3, 0, 30, 5)]);
        assert_eq!(m.pieces(10, 1), vec![p(2, 0, 0, 1)]);
        assert_eq!(m.pieces(29, 2), vec![p(2, 19, 0, 1), p(3, 0, 1, 1)]);
        assert_eq!(m.pieces(34, 1), vec![p(3, 4, 0, 1)]);
    }

    #[test]
    fn parameters() {
        let d = Dir::new();
        assert!(make_err(&SPEC, &[]).contains("at least one file="));
        assert!(make_err(&SPEC, &[("file", "/nonexistent/x")]).contains("/nonexistent/x"));
        assert!(make_err(&SPEC, &[("file", d.0.to_str().unwrap())]).contains("not a regular file"));
        let a = d.file("a", b"abc");
        assert!(make_err(&SPEC, &[("file", &a), ("bogus", "1")]).contains("unknown parameter 'bogus'"));
    }
}
