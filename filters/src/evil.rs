//! The evil filter (nbdkit-evil-filter, nbdkit 1.36): corrupt data read from the layer below,
//! silently, to test checksums in file systems and applications. Writes are untouched, so the
//! layer below keeps the right data.
//!
//! Modes (`evil=`):
//! - `cosmic-rays`: every bit read flips with probability `evil-probability` (default 1e-8),
//!   independently on every read.
//! - `stuck-bits` (default): fixed bits of the disk are stuck high or low; each bit of the disk is
//!   stuck with probability `evil-probability` (default 1e-8). A stuck bit reads as its stuck
//!   value with probability `evil-stuck-probability` (default 1: always).
//! - `stuck-wires`: like stuck-bits, but the stuck bits sit at fixed positions of every read
//!   (a bad wire on the data path) wherever on the disk it reads; default probability 1e-6.
//!
//! Everything is derived from `evil-seed` (default: the clock), so a run repeats exactly with
//! the same seed and the same requests. Which bits are stuck is a function of the seed and the
//! position only, computed on the fly a 64 KiB region at a time, so no table is kept. The
//! positions differ from nbdkit's for the same seed (another generator); the distributions are
//! the same.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
};

use crate::overlay::lock;
use crate::rng::{parse_probability, splitmix64, time_seed, Rng};

pub const SPEC: FilterSpec = FilterSpec {
    name: "evil",
    summary: "silently corrupt data read from the layer below (cosmic rays, stuck bits or wires)",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "evil", help: "cosmic-rays, stuck-bits (default) or stuck-wires." },
    ParamSpec {
        name: "evil-probability",
        help: "Probability of a flipped or stuck bit: 1e-8, 0.0001%, 1:1000000 (default 1e-8,\n\
               or 1e-6 for stuck-wires).",
    },
    ParamSpec {
        name: "evil-stuck-probability",
        help: "Probability that a stuck bit reads as its stuck value (default 1: always).",
    },
    ParamSpec { name: "evil-seed", help: "Random seed, an integer (default: from the clock)." },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    CosmicRays,
    StuckBits,
    StuckWires,
}

/// Stuck bits are worked out a region of the disk at a time.
const REGION_BITS: u64 = 64 * 1024 * 8;

#[derive(Clone, Copy, Debug)]
struct Config {
    mode: Mode,
    p: f64,
    stuck_p: f64,
    seed: u64,
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let err = |e: ConfigError| ConfigError::new(format!("evil: {}", e.0));
    let mode = match p.take("evil").as_deref() {
        None | Some("stuck-bits") | Some("stuck-bit") => Mode::StuckBits,
        Some("cosmic-rays") | Some("cosmic") => Mode::CosmicRays,
        Some("stuck-wires") | Some("stuck-wire") => Mode::StuckWires,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "evil: evil={other}: expected cosmic-rays, stuck-bits or stuck-wires"
            )))
        }
    };
    let default_p = if mode == Mode::StuckWires { 1e-6 } else { 1e-8 };
    let prob = p
        .take("evil-probability")
        .map(|v| parse_probability("evil-probability", &v))
        .transpose()
        .map_err(err)?;
    let stuck_p = p
        .take("evil-stuck-probability")
        .map(|v| parse_probability("evil-stuck-probability", &v))
        .transpose()
        .map_err(err)?;
    let seed = match p.take("evil-seed") {
        None => time_seed(),
        Some(v) => v
            .trim()
            .parse::<i64>()
            .map(|s| s as u64)
            .or_else(|_| v.trim().parse::<u64>())
            .map_err(|_| ConfigError::new(format!("evil: evil-seed: expected an integer, got '{v}'")))?,
    };
    let cfg = Config { mode, p: prob.unwrap_or(default_p), stuck_p: stuck_p.unwrap_or(1.0), seed };
    Ok(Arc::new(EvilFactory { cfg, cosmic: Arc::new(Mutex::new(Rng::new(seed))) }))
}

struct EvilFactory {
    cfg: Config,
    /// Cosmic rays and the stuck-probability draws use one stream for the whole server, so a
    /// single client sees the same corruption on every run with the same seed.
    cosmic: Arc<Mutex<Rng>>,
}

impl FilterFactory for EvilFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let inner = Evil { cfg: self.cfg, rng: self.cosmic.clone(), scratch: RefCell::new(Vec::new()) };
        Ok(Rc::new(FilterLayer { filter: EvilFilter(Rc::new(inner)), next }))
    }
}

struct EvilFilter(Rc<Evil>);

struct Evil {
    cfg: Config,
    rng: Arc<Mutex<Rng>>,
    /// Stuck positions found for a read, reused between reads.
    scratch: RefCell<Vec<(u64, bool)>>,
}

fn set_bit(buf: &mut [u8], bit: u64, value: bool) {
    let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
    if let Some(b) = buf.get_mut(byte) {
        if value {
            *b |= mask
        } else {
            *b &= !mask
        }
    }
}

/// Stuck bits among bits `[0, nbits)` of a stream seeded by `seed`: (position, stuck value).
fn stuck_in(seed: u64, p: f64, nbits: u64, out: &mut Vec<(u64, bool)>) {
    let mut r = Rng::new(seed);
    let mut bit = r.gap(p);
    while bit < nbits {
        out.push((bit, r.next_u64() & 1 == 1));
        bit = bit.saturating_add(1).saturating_add(r.gap(p));
    }
}

impl Evil {
    fn corrupt(&self, buf: &mut [u8], offset: u64) {
        let c = self.cfg;
        if c.p <= 0.0 || buf.is_empty() {
            return;
        }
        let nbits = buf.len() as u64 * 8;
        if c.mode == Mode::CosmicRays {
            let mut r = lock(&self.rng);
            let mut bit = r.gap(c.p);
            while bit < nbits {
                let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
                buf[byte] ^= mask;
                bit = bit.saturating_add(1).saturating_add(r.gap(c.p));
            }
            return;
        }
        let mut stuck = self.scratch.borrow_mut();
        stuck.clear();
        if c.mode == Mode::StuckWires {
            stuck_in(c.seed, c.p, nbits, &mut stuck);
        } else {
            // The regions the read touches; each region's stuck bits depend only on the seed and
            // the region number, so they stay put from read to read.
            let first_bit = offset * 8;
            let (r0, r1) = (first_bit / REGION_BITS, (first_bit + nbits - 1) / REGION_BITS);
            let mut region = Vec::new();
            for rg in r0..=r1 {
                region.clear();
                stuck_in(splitmix64(c.seed ^ splitmix64(rg)), c.p, REGION_BITS, &mut region);
                let base = rg * REGION_BITS;
                for (b, v) in &region {
                    let abs = base + b;
                    if abs >= first_bit && abs < first_bit + nbits {
                        stuck.push((abs - first_bit, *v));
                    }
                }
            }
        }
        if stuck.is_empty() {
            return;
        }
        let mut r = lock(&self.rng);
        for (bit, v) in stuck.iter() {
            if r.chance(c.stuck_p) {
                set_bit(buf, *bit, *v);
            }
        }
    }
}

impl Filter for EvilFilter {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let me = self.0.clone();
        next.pread(
            buf,
            offset,
            flags,
            done.map(move |r: Result<Vec<u8>, NbdError>| {
                r.map(|mut b| {
                    me.corrupt(&mut b, offset);
                    b
                })
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn flipped(a: &[u8], b: &[u8]) -> usize {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones() as usize).sum()
    }

    fn read(params: &[(&str, &str)], ram: &Rc<Ram>, offset: u64, len: usize) -> Vec<u8> {
        let sim = SimScheduler::new();
        let top = open(&configure(&SPEC, params), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pread(vec![0; len], offset, Flags::NONE, d)).unwrap()
    }

    #[test]
    fn cosmic_rays_flip_about_the_expected_number_of_bits() {
        let ram = Ram::new(1 << 20);
        let clean = ram.data.borrow().clone();
        let params = [("evil", "cosmic-rays"), ("evil-probability", "1:1000"), ("evil-seed", "42")];
        let got = read(&params, &ram, 0, 1 << 20);
        let n = flipped(&got, &clean);
        // 8 Mbit at 1e-3: about 8389.
        assert!((7500..9300).contains(&n), "{n}");
        assert_eq!(got, read(&params, &ram, 0, 1 << 20), "same seed, same corruption");
        assert_ne!(
            got,
            read(
                &[("evil", "cosmic-rays"), ("evil-probability", "1:1000"), ("evil-seed", "43")],
                &ram,
                0,
                1 << 20
            )
        );
    }

    #[test]
    fn stuck_bits_stay_put_wherever_the_read_starts() {
        let ram = Ram::new(1 << 20);
        let params = [("evil", "stuck-bits"), ("evil-probability", "1e-4"), ("evil-seed", "7")];
        let whole = read(&params, &ram, 0, 1 << 20);
        let clean = ram.data.borrow().clone();
        assert!(flipped(&whole, &clean) > 100);
        // A smaller, unaligned read sees exactly the same stuck bits at the same disk positions.
        let part = read(&params, &ram, 70001, 200000);
        assert_eq!(part, whole[70001..270001]);
        // Writes are not touched: the data below stays right.
        assert_eq!(*ram.data.borrow(), clean);
    }

    #[test]
    fn stuck_wires_hit_the_same_positions_of_every_read() {
        let ram = Ram::with(1 << 20, |r| r.data.borrow_mut().fill(0x55));
        let params = [("evil", "stuck-wires"), ("evil-probability", "1e-3"), ("evil-seed", "9")];
        let a = read(&params, &ram, 0, 4096);
        let b = read(&params, &ram, 500000, 4096);
        assert_eq!(a, b, "same wires, same data, same result");
        assert!(flipped(&a, &[0x55; 4096]) > 0);
    }

    #[test]
    fn stuck_probability_zero_means_never() {
        let ram = Ram::new(65536);
        let got = read(&[("evil-probability", "10%"), ("evil-stuck-probability", "0")], &ram, 0, 65536);
        assert_eq!(got, *ram.data.borrow());
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(make_err(&SPEC, &[("evil", "gremlins")]).contains("expected cosmic-rays"));
        assert!(make_err(&SPEC, &[("evil-probability", "2")]).contains("out of range"));
        assert!(make_err(&SPEC, &[("evil-seed", "x")]).contains("integer"));
    }
}
