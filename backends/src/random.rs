//! `random`: a non-sparse disk of pseudo-random bytes (nbdkit-random-plugin), byte for byte the
//! same as nbdkit's for the same `seed`.
//!
//! Every byte is computed from its own offset, so any range can be read without running the
//! generator from the start: byte `i` is the low byte of the third output of xoshiro256**
//! seeded (through splitmix64) with `seed + i`. Writes are accepted only if they match what is
//! already there, which makes `nbdcopy $uri $uri` a self-checking copy test; trim and zero always
//! fail with EIO, as in nbdkit.
//!
//! The generator and nbdkit's number parsing live here and are shared with `sparse-random` and
//! `partitioning`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use blocksmith_core::config::Params;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Flags, Layer, OpenCx, ParamSpec, Support,
};
use blocksmith_core::sched::Sched;
use blocksmith_core::{ConfigError, NbdError};

use crate::util;

const NAME: &str = "random";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary:
        "non-sparse disk of pseudo-random bytes, identical to nbdkit's for a seed (nbdkit-random-plugin)",
    magic: Some("size"),
    params: &[
        ParamSpec {
            name: "size",
            help: "Size of the disk (nbdkit calls it required but defaults to 0; so do we). Suffixes:\n\
                   b, s (512), K, M, G, T, P, E.",
        },
        ParamSpec {
            name: "seed",
            help: "Random seed, an unsigned 32-bit number (decimal, 0x hex or 0 octal). The same seed\n\
                   gives the same disk as nbdkit. Default: the current time in seconds.",
        },
    ],
    make,
};

/// Reads (and write checks) larger than this are generated on the blocking pool: at a few
/// nanoseconds a byte, a 64 MiB request would otherwise hold the event loop for a tenth of a
/// second, and the pool spreads big requests over every core.
const INLINE_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// The generator (nbdkit's common/include/random.h: xoshiro256** 1.0 seeded by splitmix64)
// ---------------------------------------------------------------------------------------------

/// xoshiro256** state. Never all zero: splitmix64 cannot produce four zero outputs in a row.
#[derive(Clone, Debug)]
pub(crate) struct Xoshiro {
    s: [u64; 4],
}

fn splitmix(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Xoshiro {
    /// Seed from 64 bits, as nbdkit's `xsrandom`.
    pub(crate) fn new(mut seed: u64) -> Xoshiro {
        let s0 = splitmix(&mut seed);
        let s1 = splitmix(&mut seed);
        let s2 = splitmix(&mut seed);
        let s3 = splitmix(&mut seed);
        Xoshiro { s: [s0, s1, s2, s3] }
    }

    /// 64 random bits (nbdkit's `xrandom`).
    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

/// nbdkit's default seed: the time in seconds, truncated to 32 bits.
pub(crate) fn time_seed() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// nbdkit's integer parsing (nbdkit_parse_uint32_t and friends: strtoull with base 0)
// ---------------------------------------------------------------------------------------------

/// Parse an unsigned integer as nbdkit_parse_uint*_t does: optional leading white space, then
/// decimal, `0x` hex or leading-`0` octal, nothing after it, at most `max`.
pub(crate) fn parse_uint(key: &str, s: &str, max: u64) -> Result<u64, ConfigError> {
    let bad = |why: &str| ConfigError::new(format!("{key}: could not parse number \"{s}\": {why}"));
    let t = s.trim_start();
    if t.starts_with('-') {
        return Err(ConfigError::new(format!("{key}: negative numbers are not allowed (\"{s}\")")));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() {
        return Err(bad("empty string where a number was expected"));
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad("trailing garbage"));
    }
    match u64::from_str_radix(digits, radix) {
        Ok(v) if v <= max => Ok(v),
        _ => Err(bad(&format!("out of range (at most {max})"))),
    }
}

/// `seed=` for random and sparse-random: a u32, defaulting to the time.
pub(crate) fn take_seed(params: &mut Params, backend: &str) -> Result<u32, ConfigError> {
    match params.take("seed") {
        Some(s) => {
            Ok(parse_uint("seed", &s, u64::from(u32::MAX)).map_err(|e| util::named(backend, e))? as u32)
        }
        None => Ok(time_seed()),
    }
}

// ---------------------------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------------------------

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let size = util::take_size(params, NAME)?.unwrap_or(0);
    let seed = take_seed(params, NAME)?;
    params.finish(NAME)?;
    Ok(Arc::new(RandomFactory { size, seed }))
}

/// The byte at disk offset `pos`: the low byte of the third output of the generator seeded with
/// `seed + pos` (nbdkit seeds, draws twice, keeps the third draw).
///
/// Computed in closed form, twice as fast as running the generator: the third output is
/// `rotl(s1 * 5, 7) * 9` where `s1`, after two steps, works out to `s0 ^ s3 ^ (s1 << 17)` of the
/// seeded state, and the seeded state's words are splitmix64 outputs 1, 2 and 4 — so `s2` is
/// never needed. [`byte_at_reference`] is the straightforward version the tests compare with.
#[inline]
fn byte_at(seed: u32, pos: u64) -> u8 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let x = u64::from(seed).wrapping_add(pos);
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let s0 = mix(x.wrapping_add(GOLDEN));
    let s1 = mix(x.wrapping_add(GOLDEN.wrapping_mul(2)));
    let s3 = mix(x.wrapping_add(GOLDEN.wrapping_mul(4)));
    let b = s0 ^ s3 ^ (s1 << 17);
    b.wrapping_mul(5).rotate_left(7).wrapping_mul(9) as u8
}

/// [`byte_at`] the way nbdkit computes it.
#[cfg(test)]
fn byte_at_reference(seed: u32, pos: u64) -> u8 {
    let mut st = Xoshiro::new(u64::from(seed).wrapping_add(pos));
    st.next_u64();
    st.next_u64();
    st.next_u64() as u8
}

/// Fill `buf` with the disk's contents from `offset`.
pub fn fill(seed: u32, buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(seed, offset.wrapping_add(i as u64));
    }
}

/// Does `data` match the disk's contents at `offset`?
fn matches(seed: u32, data: &[u8], offset: u64) -> bool {
    data.iter().enumerate().all(|(i, &b)| byte_at(seed, offset.wrapping_add(i as u64)) == b)
}

struct RandomFactory {
    size: u64,
    seed: u32,
}

impl BackendFactory for RandomFactory {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(RandomLayer { size: self.size, seed: self.seed, sched: cx.sched.clone() }))
    }
}

struct RandomLayer {
    size: u64,
    seed: u32,
    sched: Sched,
}

fn mismatch() -> NbdError {
    NbdError::msg(Errno::Io, "data written does not match expected")
}

impl Layer for RandomLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            // Writable, but only with what is already there.
            can_write: true,
            // nbdkit provides trim and zero only to fail them quickly with EIO.
            can_trim: true,
            zero: Support::Native,
            // Nothing is stored: caching is a no-op.
            cache: Support::Native,
            ..ExportInfo::read_only(self.size)
        }
    }

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        let seed = self.seed;
        if buf.len() <= INLINE_BYTES {
            fill(seed, &mut buf, offset);
            return done.ok(buf);
        }
        self.sched.blocking(
            move || {
                fill(seed, &mut buf, offset);
                buf
            },
            move |buf| done.ok(buf),
        )
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        let seed = self.seed;
        let inline = data.len() <= INLINE_BYTES;
        let check = move || if matches(seed, &data, offset) { Ok(()) } else { Err(mismatch()) };
        if inline {
            return done.call(check());
        }
        self.sched.blocking(check, move |r| done.call(r))
    }

    fn trim(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.err(NbdError::msg(Errno::Io, "attempt to trim or zero non-sparse random disk"))
    }

    fn zero(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.err(NbdError::msg(Errno::Io, "attempt to trim or zero non-sparse random disk"))
    }

    fn cache(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};

    #[test]
    fn generator_matches_reference() {
        // splitmix64 from seed 0: the reference implementation's first outputs.
        let mut s = 0u64;
        assert_eq!(splitmix(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix(&mut s), 0x6e78_9e6a_a1b9_65f4);
        // xoshiro256** from the state {1, 2, 3, 4}: the reference's first outputs.
        let mut x = Xoshiro { s: [1, 2, 3, 4] };
        assert_eq!(x.next_u64(), 11520);
        assert_eq!(x.next_u64(), 0);
        assert_eq!(x.next_u64(), 1509978240);
        assert_eq!(x.next_u64(), 1215971899390074240);
    }

    #[test]
    fn closed_form_matches_the_generator() {
        for seed in [0u32, 1, 42, u32::MAX] {
            for pos in (0..5000u64).chain([u64::MAX - 3, u64::MAX, 1 << 40, (1 << 63) - 1]) {
                assert_eq!(byte_at(seed, pos), byte_at_reference(seed, pos), "seed {seed} pos {pos}");
            }
        }
    }

    #[test]
    fn content_is_positional_and_seeded() {
        let c = open(make(&SPEC, &[("size", "1M"), ("seed", "42")]).unwrap(), false);
        let all = c.read(8192, 0).unwrap();
        // Any sub-range reads the same bytes, aligned or not.
        for (off, len) in [(0usize, 1usize), (1, 7), (4095, 3), (5000, 3000)] {
            assert_eq!(c.read(len, off as u64).unwrap(), &all[off..off + len]);
        }
        // Not constant, and a different seed gives a different disk.
        assert!(all.iter().any(|&b| b != all[0]));
        let d = open(make(&SPEC, &[("size", "1M"), ("seed", "43")]).unwrap(), false);
        assert_ne!(d.read(8192, 0).unwrap(), all);
        // Seed s at offset o is seed s+1 at offset o-1: nbdkit seeds with seed + offset.
        assert_eq!(d.read(100, 0).unwrap(), &all[1..101]);
        // A large read goes through the pool and agrees with small ones.
        let big = c.read(INLINE_BYTES + 4096, 1000).unwrap();
        assert_eq!(&big[..7192], &all[1000..]);
        assert_eq!(big[INLINE_BYTES], byte_at(42, 1000 + INLINE_BYTES as u64));
    }

    #[test]
    fn writes_are_checked() {
        let c = open(make(&SPEC, &[("size", "1M"), ("seed", "7")]).unwrap(), false);
        let i = c.info();
        assert!(i.can_write && i.can_trim && !i.can_flush && !i.can_extents && i.can_multi_conn);
        let same = c.read(3000, 12345).unwrap();
        c.write(&same, 12345, Flags::NONE).unwrap();
        let mut other = same.clone();
        other[2999] ^= 1;
        let e = c.write(&other, 12345, Flags::NONE).unwrap_err();
        assert_eq!(e.errno, Errno::Io);
        // Big writes are checked on the pool.
        let big = c.read(INLINE_BYTES * 2, 0).unwrap();
        c.write(&big, 0, Flags::NONE).unwrap();
        assert_eq!(c.write(&vec![0; INLINE_BYTES * 2], 0, Flags::NONE).unwrap_err().errno, Errno::Io);
        assert_eq!(c.trim(512, 0, Flags::NONE).unwrap_err().errno, Errno::Io);
        assert_eq!(c.zero(512, 0, Flags::NONE).unwrap_err().errno, Errno::Io);
        c.cache(4096, 0).unwrap();
    }

    #[test]
    fn parameters() {
        assert_eq!(open(make(&SPEC, &[]).unwrap(), false).info().size, 0);
        let hex = open(make(&SPEC, &[("size", "1K"), ("seed", "0x10")]).unwrap(), false);
        let dec = open(make(&SPEC, &[("size", "1K"), ("seed", "16")]).unwrap(), false);
        let oct = open(make(&SPEC, &[("size", "1K"), ("seed", "020")]).unwrap(), false);
        assert_eq!(hex.read(64, 0).unwrap(), dec.read(64, 0).unwrap());
        assert_eq!(oct.read(64, 0).unwrap(), dec.read(64, 0).unwrap());
        assert!(make_err(&SPEC, &[("seed", "-1")]).contains("negative"));
        assert!(make_err(&SPEC, &[("seed", "4294967296")]).contains("out of range"));
        assert!(make_err(&SPEC, &[("seed", "12x")]).contains("trailing garbage"));
        assert!(make_err(&SPEC, &[("seed", "")]).contains("empty"));
        assert!(make_err(&SPEC, &[("size", "big")]).starts_with("random: size:"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("percent", "1")]).contains("unknown parameter 'percent'"));
        assert_eq!(parse_uint("k", " 0777", 1000).unwrap(), 0o777);
        assert_eq!(parse_uint("k", "0", 0).unwrap(), 0);
        assert!(parse_uint("k", "08", 1000).is_err());
        assert!(parse_uint("k", "0x", 1000).is_err());
    }
}
