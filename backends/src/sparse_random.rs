//! `sparse-random`: a disk shaped like a virtual machine image — runs of data among runs of
//! holes — for load-testing copy tools (nbdkit-sparse-random-plugin). Layout and content are
//! byte for byte nbdkit's for the same parameters.
//!
//! The disk is cut into 4 KiB blocks, each data or hole. At start-up a two-state Markov chain
//! walks the blocks (one xoshiro256** draw per block, seeded with `seed`): in a hole it turns to
//! data with probability Pᴴᴰ, in data it turns to a hole with probability Pᴰᴴ = 4096/runlength,
//! and Pᴴᴰ is chosen so that `percent` of the blocks are data. The result is one bit per block.
//!
//! A data block is one random non-zero byte repeated (or, with `random-content=true`, 4096
//! random bytes) from the generator seeded with `seed + offset`, where `offset` is where the
//! read started within that block. For aligned requests that is the block's own offset. For a
//! request starting inside a block, nbdkit seeds that first block with the unaligned start
//! offset, so the same byte reads differently depending on where a request starts; we do the
//! same so that every request gets nbdkit's answer (and writes, which are checked against what
//! a read at the same offset returns, are accepted exactly when nbdkit accepts them).
//!
//! Writes succeed only if they match what is there; trim and zero only on holes (else EIO).
//! Block status reports the holes, from the bit map, a 64-block word at a time.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec, Support,
    EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::sched::Sched;
use blocksmith_core::{ConfigError, NbdError};

use crate::random::{parse_uint, take_seed, Xoshiro};
use crate::util;

const NAME: &str = "sparse-random";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "sparse disk of random data runs and holes, identical to nbdkit's for a seed (nbdkit-sparse-random-plugin)",
    magic: Some("size"),
    params: &[
        ParamSpec {
            name: "size",
            help: "Size of the disk (nbdkit calls it required but defaults to 0; so do we). Suffixes:\n\
                   b, s (512), K, M, G, T, P, E. The block map takes 1 bit per 4 KiB (32 MiB per TiB).",
        },
        ParamSpec {
            name: "seed",
            help: "Random seed, an unsigned 32-bit number. The same seed and parameters give the same\n\
                   disk as nbdkit. Default: the current time in seconds.",
        },
        ParamSpec { name: "percent", help: "Percentage of the disk that is data, 0 to 100 (default 10)." },
        ParamSpec {
            name: "runlength",
            help: "Expected average length of a run of data, in bytes, > 0 (default 16M). A size\n\
                   suffix (K, M, G...) is accepted here too, as nbdkit's manual promises.",
        },
        ParamSpec {
            name: "random-content",
            help: "false (default): each data block is one random non-zero byte repeated.\n\
                   true: every byte of a data block is random (slower to generate and check).",
        },
    ],
    make,
};

/// The unit of the layout: one bit of the map per block.
const BLOCK: u64 = 4096;
const BLOCK_USIZE: usize = BLOCK as usize;

/// Requests larger than this are generated or checked on the blocking pool when blocks have
/// fully random content (about a nanosecond a byte); one repeated byte is generated in place.
const INLINE_RANDOM_BYTES: usize = 64 * 1024;

/// Runs one block-status request may report. Less than asked is a valid answer, and this keeps
/// a long request over a finely fragmented disk from holding the event loop.
const MAX_RUNS_PER_EXTENTS: usize = 64 * 1024;

/// Which blocks hold data.
enum Layout {
    AllHoles,
    AllData,
    /// Bit `i % 64` of word `i / 64` is block `i`. Blocks past the end of the disk are holes.
    Map(Vec<u64>),
}

impl Layout {
    fn is_data(&self, blk: u64) -> bool {
        match self {
            Layout::AllHoles => false,
            Layout::AllData => true,
            Layout::Map(words) => words.get((blk / 64) as usize).is_some_and(|w| (w >> (blk % 64)) & 1 == 1),
        }
    }

    /// The first block at or after `blk` whose state differs from `data`, or `limit` if there is
    /// none before it.
    fn next_change(&self, blk: u64, data: bool, limit: u64) -> u64 {
        let words = match self {
            Layout::Map(w) => w,
            _ => return limit,
        };
        let mut wi = (blk / 64) as usize;
        // Look for a 0 bit in a data run, a 1 bit in a hole run: invert data words.
        let flip = if data { u64::MAX } else { 0 };
        // Bits below `blk` in its word do not count.
        // Blocks past the map are holes (0 bits), like the padding bits of its last word.
        let mut word = words.get(wi).map_or(flip, |w| w ^ flip) & (u64::MAX << (blk % 64));
        loop {
            if word != 0 {
                return (wi as u64 * 64 + u64::from(word.trailing_zeros())).min(limit);
            }
            wi += 1;
            if wi as u64 * 64 >= limit {
                return limit;
            }
            word = words.get(wi).map_or(flip, |w| w ^ flip);
        }
    }
}

/// Parameters that decide the disk, fixed at start-up.
struct Disk {
    size: u64,
    seed: u32,
    random_content: bool,
    layout: Layout,
}

/// Run the Markov chain over the blocks, exactly as nbdkit's get_ready does.
fn build_layout(size: u64, seed: u32, percent: f64, runlength: u64) -> Result<Layout, String> {
    if percent == 0.0 {
        return Ok(Layout::AllHoles);
    }
    if percent == 100.0 {
        return Ok(Layout::AllData);
    }
    let blocks = size.div_ceil(BLOCK);
    let nwords = usize::try_from(blocks.div_ceil(64)).map_err(|_| "the disk is too large".to_string())?;
    let mut words: Vec<u64> = Vec::new();
    words.try_reserve_exact(nwords).map_err(|_| {
        format!("cannot allocate the block map ({} bytes for a {size}-byte disk)", nwords as u64 * 8)
    })?;
    words.resize(nwords, 0);

    // The same floating-point steps as nbdkit, so every comparison below comes out the same.
    let p_dh = 1.0 / (runlength as f64 / BLOCK as f64);
    let p_hd = (percent / 100.0) * p_dh / (1.0 - (percent / 100.0));
    // Flip when the draw, as a double, is at most P × UINT64_MAX. Index 0: in a hole.
    let threshold = [p_hd * u64::MAX as f64, p_dh * u64::MAX as f64];
    let mut rs = Xoshiro::new(u64::from(seed));
    let mut state = 0usize;
    for (wi, w) in words.iter_mut().enumerate() {
        let mut bits = 0u64;
        let n = (blocks - wi as u64 * 64).min(64);
        for b in 0..n {
            bits |= (state as u64) << b;
            if rs.next_u64() as f64 <= threshold[state] {
                state ^= 1;
            }
        }
        *w = bits;
    }
    Ok(Layout::Map(words))
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let err = |m: String| ConfigError::new(format!("{NAME}: {m}"));
    let size = util::take_size(params, NAME)?.unwrap_or(0);
    let seed = take_seed(params, NAME)?;
    let percent = match params.take("percent") {
        None => 10.0,
        Some(p) => match p.trim().parse::<f64>() {
            Ok(v) if (0.0..=100.0).contains(&v) => v,
            _ => return Err(err(format!("cannot parse percent '{p}' (expected a number from 0 to 100)"))),
        },
    };
    let runlength = match params.take("runlength") {
        None => 16 * 1024 * 1024,
        Some(r) => {
            // nbdkit takes a plain number (decimal, hex or octal); its manual promises size
            // suffixes too, so accept those as well.
            let v = parse_uint("runlength", &r, u64::MAX)
                .or_else(|e| blocksmith_core::config::parse_size(&r).map_err(|_| e))
                .map_err(|e| util::named(NAME, e))?;
            if v == 0 {
                return Err(err("runlength must be > 0".into()));
            }
            v
        }
    };
    let random_content =
        params.take_bool("random-content").map_err(|e| util::named(NAME, e))?.unwrap_or(false);
    params.finish(NAME)?;
    let layout = build_layout(size, seed, percent, runlength).map_err(err)?;
    if let Layout::Map(w) = &layout {
        let data: u64 = w.iter().map(|x| u64::from(x.count_ones())).sum();
        log::debug!(
            "{NAME}: {data} of {} blocks are data ({:.3}% requested {percent}%)",
            size.div_ceil(BLOCK),
            100.0 * (data * BLOCK) as f64 / size as f64
        );
    }
    Ok(Arc::new(SparseRandomFactory { disk: Arc::new(Disk { size, seed, random_content, layout }) }))
}

impl Disk {
    /// The contents of block `blk` as a read starting at `offset` (within that block) sees it:
    /// `out[k]` is byte `k` of the block. See the module docs for why `offset` matters.
    fn block(&self, blk: u64, offset: u64, out: &mut [u8]) {
        if !self.layout.is_data(blk) {
            out.fill(0);
        } else if !self.random_content {
            out.fill(self.fill_byte(offset));
        } else {
            let mut st = Xoshiro::new(u64::from(self.seed).wrapping_add(offset));
            for b in out.iter_mut() {
                *b = st.next_u64() as u8;
            }
        }
    }

    /// The byte repeated over a data block when content is not fully random: never zero.
    fn fill_byte(&self, offset: u64) -> u8 {
        match Xoshiro::new(u64::from(self.seed).wrapping_add(offset)).next_u64() as u8 {
            0 => 1,
            b => b,
        }
    }

    /// Fill `buf` with what a read at `offset` returns.
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut block = [0u8; BLOCK_USIZE];
        let mut pos = offset;
        let mut at = 0usize;
        // Unaligned head: the block seeded with the unaligned offset (as nbdkit).
        let k = (pos % BLOCK) as usize;
        if k != 0 {
            let n = (BLOCK_USIZE - k).min(buf.len());
            self.block(pos / BLOCK, pos, &mut block[..k + n]);
            buf[..n].copy_from_slice(&block[k..k + n]);
            at = n;
            pos += n as u64;
        }
        // Whole blocks, then a partial tail: both start on a block boundary.
        while at < buf.len() {
            let n = (buf.len() - at).min(BLOCK_USIZE);
            self.block(pos / BLOCK, pos, &mut buf[at..at + n]);
            at += n;
            pos += n as u64;
        }
    }

    /// Does a write of `data` at `offset` match what a read at `offset` returns?
    fn matches(&self, data: &[u8], offset: u64) -> bool {
        let mut block = [0u8; BLOCK_USIZE];
        let mut pos = offset;
        let mut at = 0usize;
        while at < data.len() {
            let k = (pos % BLOCK) as usize;
            let n = (BLOCK_USIZE - k).min(data.len() - at);
            let piece = &data[at..at + n];
            let blk = pos / BLOCK;
            let ok = if !self.layout.is_data(blk) {
                util::is_zero(piece)
            } else if !self.random_content {
                let b = self.fill_byte(pos);
                piece.iter().all(|&x| x == b)
            } else {
                self.block(blk, pos, &mut block[..k + n]);
                piece == &block[k..k + n]
            };
            if !ok {
                return false;
            }
            at += n;
            pos += n as u64;
        }
        true
    }

    /// Trim and zero may only touch holes: true if every block the range touches is one.
    fn all_holes(&self, count: u64, offset: u64) -> bool {
        let first = offset / BLOCK;
        let end = (offset + count).div_ceil(BLOCK);
        !self.layout.is_data(first) && self.layout.next_change(first, false, end) >= end
    }

    fn extents(&self, count: u64, offset: u64, req_one: bool) -> Extents {
        let end = offset + count;
        let mut e = Extents::new();
        let mut pos = offset;
        let mut runs = 0;
        while pos < end && runs < MAX_RUNS_PER_EXTENTS {
            let blk = pos / BLOCK;
            let data = self.layout.is_data(blk);
            let limit = end.div_ceil(BLOCK);
            let stop = (self.layout.next_change(blk, data, limit).saturating_mul(BLOCK)).min(end);
            e.push(stop - pos, if data { 0 } else { EXTENT_HOLE | EXTENT_ZERO });
            pos = stop;
            runs += 1;
            if req_one {
                break;
            }
        }
        e
    }
}

struct SparseRandomFactory {
    disk: Arc<Disk>,
}

impl BackendFactory for SparseRandomFactory {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(SparseRandomLayer { disk: self.disk.clone(), sched: cx.sched.clone() }))
    }
}

struct SparseRandomLayer {
    disk: Arc<Disk>,
    sched: Sched,
}

impl SparseRandomLayer {
    /// Fully random blocks cost about a nanosecond a byte: big requests go to the pool.
    fn offload(&self, len: usize) -> bool {
        self.disk.random_content && len > INLINE_RANDOM_BYTES
    }
}

fn trim_error() -> NbdError {
    NbdError::msg(Errno::Io, "trying to trim or zero non-hole in disk")
}

impl Layer for SparseRandomLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            can_write: true,
            // Nothing is stored, so flush and FUA have nothing to do (nbdkit has a no-op flush
            // so that `nbdcopy --flush` works).
            can_flush: true,
            fua: Support::Native,
            can_trim: true,
            zero: Support::Native,
            can_extents: true,
            cache: Support::Native,
            ..ExportInfo::read_only(self.disk.size)
        }
    }

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        if !self.offload(buf.len()) {
            self.disk.read(&mut buf, offset);
            return done.ok(buf);
        }
        let disk = self.disk.clone();
        self.sched.blocking(
            move || {
                disk.read(&mut buf, offset);
                buf
            },
            move |buf| done.ok(buf),
        )
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        let offload = self.offload(data.len());
        let disk = self.disk.clone();
        let check = move || {
            if disk.matches(&data, offset) {
                Ok(())
            } else {
                Err(NbdError::msg(Errno::Io, "data written does not match expected"))
            }
        };
        if !offload {
            return done.call(check());
        }
        self.sched.blocking(check, move |r| done.call(r))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        done.ok(())
    }

    fn trim(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        done.call(if self.disk.all_holes(count, offset) { Ok(()) } else { Err(trim_error()) })
    }

    fn zero(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        done.call(if self.disk.all_holes(count, offset) { Ok(()) } else { Err(trim_error()) })
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        done.ok(self.disk.extents(count, offset, flags.contains(Flags::REQ_ONE)))
    }

    fn cache(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open, Conn};

    const HZ: u32 = EXTENT_HOLE | EXTENT_ZERO;

    fn conn(kv: &[(&str, &str)]) -> Conn {
        open(make(&SPEC, kv).unwrap(), false)
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn content_matches_nbdkit() {
        // Vectors read from nbdkit 1.32.5 (`sparse-random 1M seed=1 percent=100`), including its
        // unaligned-start quirk (module docs).
        let c = conn(&[("size", "1M"), ("seed", "1"), ("percent", "100")]);
        assert_eq!(hex(&c.read(4, 0).unwrap()), "c5c5c5c5");
        assert_eq!(hex(&c.read(10, 4097).unwrap()), "47".repeat(10));
        assert_eq!(hex(&c.read(10, 100).unwrap()), "e3".repeat(10));
        let aligned = c.read(8192, 0).unwrap();
        assert_eq!(hex(&aligned[4097..4107]), "0e".repeat(10));
        let r = conn(&[("size", "1M"), ("seed", "1"), ("percent", "100"), ("random-content", "true")]);
        assert_eq!(hex(&r.read(4, 0).unwrap()), "c5ea14a7");
        assert_eq!(hex(&r.read(10, 4097).unwrap()), "79aee5240b576d9f1857");
        assert_eq!(hex(&r.read(10, 100).unwrap()), "3f67b4b00c7dc1fb9b5a");
        let aligned = r.read(8192, 0).unwrap();
        assert_eq!(hex(&aligned[4097..4107]), "76f99d15e770a7d0d0fe");
        assert_eq!(hex(&aligned[100..110]), "490b629e8b853e5ddc62");
        // A long read through the pool agrees with block-sized ones.
        let big = r.read(INLINE_RANDOM_BYTES + 8192, 0).unwrap();
        assert_eq!(&big[..8192], &aligned[..]);
    }

    #[test]
    fn layout_matches_nbdkit() {
        // `nbdinfo --map` of nbdkit 1.32.5 `sparse-random 100M seed=3 runlength=1048576`.
        let c = conn(&[("size", "100M"), ("seed", "3"), ("runlength", "1048576")]);
        let e = c.extents(100 << 20, 0, Flags::NONE).unwrap();
        assert_eq!(&e[..4], &[(14606336, HZ), (65536, 0), (1908736, HZ), (114688, 0)]);
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 100 << 20);
        // Suffixes mean the same as plain numbers.
        let s = conn(&[("size", "100M"), ("seed", "3"), ("runlength", "1M")]);
        assert_eq!(s.extents(100 << 20, 0, Flags::NONE).unwrap(), e);
        // Holes read as zeroes, data as a non-zero byte, each block on its own.
        assert_eq!(c.read(4096, 0).unwrap(), vec![0; 4096]);
        let d = c.read(65536, 14606336).unwrap();
        assert!(d.iter().all(|&b| b != 0));
        assert!(d.chunks(4096).all(|blk| blk.iter().all(|&b| b == blk[0])));
        // From an unaligned offset, clipped, and REQ_ONE.
        assert_eq!(c.extents(10, 14606336 - 5, Flags::NONE).unwrap(), vec![(5, HZ), (5, 0)]);
        assert_eq!(c.extents(1 << 20, 14606336 + 7, Flags::REQ_ONE).unwrap(), vec![(65529, 0)]);
    }

    #[test]
    fn percent_and_runlength_are_honoured() {
        let size = 1u64 << 30;
        let c = conn(&[("size", "1G"), ("seed", "99"), ("percent", "30"), ("runlength", "1M")]);
        let mut pos = 0;
        let (mut data, mut runs) = (0u64, 0u64);
        while pos < size {
            for (len, flags) in c.extents(size - pos, pos, Flags::NONE).unwrap() {
                if flags == 0 {
                    data += len;
                    runs += 1;
                }
                pos += len;
            }
        }
        let pct = 100.0 * data as f64 / size as f64;
        assert!((20.0..40.0).contains(&pct), "{pct}% data");
        let avg = data / runs;
        assert!(((1 << 20) / 2..(1 << 20) * 2).contains(&avg), "average run {avg}");
        // The extremes need no map at all.
        let empty = conn(&[("size", "1P"), ("percent", "0")]);
        assert_eq!(empty.extents(1 << 50, 0, Flags::NONE).unwrap(), vec![(1 << 50, HZ)]);
        let full = conn(&[("size", "1P"), ("percent", "100")]);
        assert_eq!(full.extents(1 << 40, 5, Flags::NONE).unwrap(), vec![(1 << 40, 0)]);
    }

    #[test]
    fn writes_trims_and_zeroes_are_checked() {
        let c = conn(&[("size", "100M"), ("seed", "3"), ("runlength", "1048576")]);
        let i = c.info();
        assert!(i.can_write && i.can_flush && i.can_trim && i.can_extents && i.can_multi_conn);
        // Copying the disk onto itself works, aligned or not (a write is compared with a read
        // at the same offset).
        for (off, len) in [(14606336 - 4096, 3 * 4096), (14606336 - 100, 333), (14606336 + 1, 4095)] {
            let d = c.read(len, off).unwrap();
            c.write(&d, off, Flags::FUA).unwrap();
            let mut bad = d.clone();
            bad[len / 2] ^= 0x40;
            assert_eq!(c.write(&bad, off, Flags::NONE).unwrap_err().errno, Errno::Io);
        }
        c.write(&[0; 8192], 0, Flags::NONE).unwrap();
        assert_eq!(c.write(&[1], 0, Flags::NONE).unwrap_err().errno, Errno::Io);
        // Trim and zero: holes only.
        c.trim(1 << 20, 0, Flags::NONE).unwrap();
        c.zero(14606336 - 10, 10, Flags::NONE).unwrap();
        assert_eq!(c.zero(20, 14606336 - 10, Flags::NONE).unwrap_err().errno, Errno::Io);
        assert_eq!(c.trim(1, 14606336 + 4095, Flags::NONE).unwrap_err().errno, Errno::Io);
        c.flush().unwrap();
        c.cache(1 << 20, 0).unwrap();
        // With random content, big checks run on the pool.
        let r = conn(&[("size", "4M"), ("seed", "5"), ("percent", "100"), ("random-content", "1")]);
        let d = r.read(1 << 20, 0).unwrap();
        r.write(&d, 0, Flags::NONE).unwrap();
        assert_eq!(r.write(&vec![0; 1 << 20], 0, Flags::NONE).unwrap_err().errno, Errno::Io);
    }

    #[test]
    fn odd_sizes() {
        // The last block is partial; reading and mapping stop at the end.
        let c = conn(&[("size", "10000"), ("seed", "1"), ("percent", "100")]);
        assert_eq!(c.info().size, 10000);
        assert_eq!(c.read(10000, 0).unwrap().len(), 10000);
        assert_eq!(c.extents(10000, 0, Flags::NONE).unwrap(), vec![(10000, 0)]);
        let z = conn(&[("seed", "1")]);
        assert_eq!(z.info().size, 0);
    }

    #[test]
    fn parameters() {
        assert!(make_err(&SPEC, &[("size", "1M"), ("percent", "101")]).contains("percent"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("percent", "-1")]).contains("percent"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("percent", "ten")]).contains("percent"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("runlength", "0")]).contains("> 0"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("runlength", "lots")]).contains("runlength"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("random-content", "maybe")]).contains("random-content"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("seed", "-5")]).contains("negative"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("bogus", "1")]).contains("unknown parameter 'bogus'"));
        assert!(make(&SPEC, &[("size", "1M"), ("percent", "12.5"), ("runlength", "0x100000")]).is_ok());
    }
}
