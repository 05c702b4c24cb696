//! Random client input never panics (debug builds also trap arithmetic overflow) and always
//! ends in a consistent state.

use super::harness::*;
use crate::conn::ConnConfig;
use crate::proto::*;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Up to `max - 1` random bytes.
    fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }
}

fn interesting_u64(r: &mut Rng) -> u64 {
    r.pick(&[
        0,
        1,
        511,
        512,
        4096,
        65536,
        1 << 20,
        (1 << 20) - 1,
        u64::from(u32::MAX),
        u64::MAX,
        u64::MAX - 4095,
    ])
    .wrapping_add(r.below(3))
}

fn random_option(r: &mut Rng) -> Vec<u8> {
    let code = r.pick(&[0u32, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x8000_0001]);
    let data = match r.below(4) {
        0 => encode_info_request(&String::from_utf8_lossy(&r.some_bytes(8)), &[0, 1, 2, 3, 77]),
        1 => encode_meta_context_request("", &["base:allocation", "base:", "x:y"]),
        2 => {
            let mut d = encode_meta_context_request("", &["base:allocation"]);
            let i = r.below(d.len() as u64) as usize;
            d[i] = r.next() as u8;
            d
        }
        _ => r.some_bytes(40),
    };
    let mut v = Vec::new();
    encode_option_request(&mut v, code, &data);
    if r.below(20) == 0 {
        // Lie about the length.
        let l = r.next() as u32 % 64;
        v[12..16].copy_from_slice(&l.to_be_bytes());
    }
    v
}

fn random_request(r: &mut Rng, h: &H) -> Vec<u8> {
    let typ = r.pick(&[
        CMD_READ,
        CMD_WRITE,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_CACHE,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
        8,
        200,
    ]);
    let flags = if r.below(2) == 0 { 0 } else { r.next() as u16 & 0x3f };
    let offset = interesting_u64(r);
    let len = if r.below(3) == 0 { interesting_u64(r) } else { r.below(9000) };
    let mut v = h.req_bytes(typ, flags, r.next(), offset, len);
    let payload = if h.ext {
        if flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            len
        } else {
            0
        }
    } else if typ == CMD_WRITE {
        len
    } else {
        0
    };
    if payload <= 9000 {
        v.extend(r.bytes(payload as usize));
    }
    v
}

#[test]
fn random_input_never_panics() {
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..2000 {
        let cfg = ConnConfig {
            max_request: r.pick(&[4096, 1 << 20, u32::MAX]),
            max_in_flight: r.pick(&[1, 4, 64]),
            max_queued_reply_bytes: r.pick(&[1, 100_000]),
            ..ConnConfig::default()
        };
        let mut h = H::new(cfg);
        h.auto_requests = r.below(4) != 0;
        h.greeting();
        h.client_flags(if r.below(30) == 0 { r.next() as u32 } else { 3 });
        for _ in 0..r.below(6) {
            let o = random_option(&mut r);
            h.send(&o);
            let _ = h.rx_len();
        }
        if !h.conn.is_aborted() && !h.conn.is_finished() && !h.conn.in_transmission() {
            let code = if r.below(2) == 0 { OPT_EXTENDED_HEADERS } else { OPT_STRUCTURED_REPLY };
            h.opt(code, &[]);
            h.opt(OPT_GO, &encode_info_request("", &[]));
        }
        let _ = h.rx_len();
        h.discard_rx();
        // The client follows whatever the server agreed to (tests see the private state).
        h.ext = h.conn.extended;
        h.structured = h.conn.structured_replies();
        for _ in 0..r.below(30) {
            let v = if r.below(25) == 0 { r.some_bytes(64) } else { random_request(&mut r, &h) };
            h.send(&v);
            if r.below(3) == 0 {
                h.complete_all();
            }
            let _ = h.rx_len();
            if h.conn.is_aborted() || h.conn.is_finished() {
                break;
            }
        }
        // Draining output may let more buffered requests through; answer until quiet.
        while {
            h.complete_all();
            let _ = h.rx_len();
            !h.held.is_empty()
        } {}
        if !h.conn.is_aborted() {
            // After EOF nothing is in flight: answered requests are gone and a WRITE whose
            // payload was still arriving is dropped.
            h.eof();
            assert!(h.conn.is_finished());
            assert_eq!(
                h.conn.in_flight(),
                0,
                "round {round}: {:?} phase {:?} closing {} seen {:?} held {}",
                h.conn.slots.v,
                h.conn.phase,
                h.conn.closing,
                h.seen,
                h.held.len()
            );
        }
        let budget = h.budget.clone();
        drop(h);
        assert_eq!(budget.used(), 0, "round {round}: budget leaked");
    }
}
