//! Requests and replies: simple, structured and extended; flag checks; limits and
//! backpressure.

use super::harness::*;
use crate::budget::Budget;
use crate::conn::{ConnConfig, Outcome};
use crate::error::{Errno, NbdError};
use crate::layer::{Extent, Extents, Flags, Lent};
use crate::limits;
use crate::proto::*;

#[test]
fn simple_write_then_read() {
    let mut h = H::simple();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    h.write(CMD_FLAG_FUA, 0x1111, 4096, &data);
    assert_eq!(h.reply(0x1111), Ok(()));
    h.req(CMD_READ, 0, 0x2222, 4096, 4096);
    assert_eq!(h.read_reply(0x2222, 4096, 4096).unwrap(), data);
    assert_eq!(h.seen[0], ("write".into(), 4096, Flags::FUA, 4096));
    for (cmd, name) in
        [(CMD_FLUSH, "flush"), (CMD_TRIM, "trim"), (CMD_CACHE, "cache"), (CMD_WRITE_ZEROES, "zero")]
    {
        h.req(cmd, 0, u64::from(cmd), 0, 512);
        assert_eq!(h.reply(u64::from(cmd)), Ok(()));
        assert_eq!(h.seen.last().unwrap().0, name);
    }
    // Errors from the layer travel back with the cookie.
    h.req(CMD_READ, 0, 0x3333, DISK_SIZE as u64, 1);
    assert_eq!(h.read_reply(0x3333, DISK_SIZE as u64, 1), Err((EINVAL, String::new())));
    h.write(0, 0x4444, DISK_SIZE as u64 - 1, &[1, 2]);
    assert_eq!(h.reply(0x4444), Err(ENOSPC));
    assert_eq!(h.budget.used(), 0);
}

#[test]
fn unknown_commands_get_einval() {
    let mut h = H::simple();
    for (i, cmd) in [CMD_RESIZE, 99, 0xffff].into_iter().enumerate() {
        h.req(cmd, 0, 0xabc0 + i as u64, 0, 4096);
        assert_eq!(h.reply(0xabc0 + i as u64), Err(EINVAL));
    }
    assert!(h.seen.is_empty());
    h.req(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(h.reply(1), Ok(()));
}

#[test]
fn misapplied_flags_get_einval() {
    let mut h = H::simple();
    let cases = [
        (CMD_READ, CMD_FLAG_NO_HOLE),
        (CMD_READ, CMD_FLAG_REQ_ONE),
        (CMD_READ, CMD_FLAG_DF), // DF needs structured replies
        (CMD_FLUSH, CMD_FLAG_FAST_ZERO),
        (CMD_TRIM, CMD_FLAG_NO_HOLE),
        (CMD_FLUSH, 0x0100),
        (CMD_READ, CMD_FLAG_PAYLOAD_LEN), // extended headers only
    ];
    for (i, (cmd, flag)) in cases.into_iter().enumerate() {
        h.req(cmd, flag, i as u64, 0, 512);
        assert_eq!(h.reply(i as u64), Err(EINVAL), "command {cmd} flag {flag:#x}");
    }
    assert!(h.seen.is_empty());

    // FUA on an export without SEND_FUA, FAST_ZERO without SEND_FAST_ZERO.
    let mut h = H::default_h();
    h.start();
    h.go("ro");
    h.req(CMD_READ, CMD_FLAG_FUA, 1, 0, 512);
    assert_eq!(h.reply(1), Err(EINVAL));
    h.req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 2, 0, 512);
    assert_eq!(h.reply(2), Err(EINVAL));
    assert!(h.seen.is_empty());
}

#[test]
fn write_zeroes_flags_translate() {
    let mut h = H::simple();
    h.req(CMD_WRITE_ZEROES, 0, 1, 0, 4096);
    h.req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 2, 0, 4096);
    h.req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 3, 0, 4096);
    h.req(CMD_READ, CMD_FLAG_FUA, 4, 0, 1); // FUA is accepted on any command
    let flags: Vec<Flags> = h.seen.iter().map(|s| s.2).collect();
    assert_eq!(flags, vec![Flags::MAY_TRIM, Flags::FUA, Flags::MAY_TRIM | Flags::FAST_ZERO, Flags::FUA]);
}

#[test]
fn refused_write_still_consumes_its_payload() {
    let mut h = H::simple();
    // NO_HOLE is not valid on WRITE; its 8 KiB payload must not be parsed as requests.
    h.write(CMD_FLAG_NO_HOLE, 7, 0, &vec![0x25; 8192]);
    assert_eq!(h.reply(7), Err(EINVAL));
    h.req(CMD_READ, 0, 8, 0, 4);
    assert_eq!(h.read_reply(8, 0, 4).unwrap(), h.disk[..4]);
    assert!(!h.conn.is_aborted());

    // A write on a read-only export reaches the layer (EPERM there) with its payload.
    let mut h = H::default_h();
    h.start();
    h.go("ro");
    h.auto_requests = false;
    h.write(0, 9, 0, &[1; 100]);
    assert_eq!(h.held.len(), 1);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Err(NbdError::msg(Errno::Perm, "read-only")));
    assert_eq!(h.reply(9), Err(EPERM));
}

#[test]
fn oversized_read_is_refused_and_the_connection_continues() {
    let mut h = H::new(ConnConfig { max_request: 1 << 20, ..ConnConfig::default() });
    h.start();
    h.go("");
    h.req(CMD_READ, 0, 1, 0, (1 << 20) + 1);
    assert_eq!(h.read_reply(1, 0, 0), Err((EINVAL, String::new())));
    h.req(CMD_READ, 0, 2, 0, 1 << 20);
    assert_eq!(h.read_reply(2, 0, 1 << 20).unwrap(), h.disk);
}

#[test]
fn write_over_the_maximum_but_within_32_mib_is_refused_and_the_connection_lives_on() {
    // §M item 129: a payload up to 32 MiB is not a denial of service, whatever was advertised.
    let mut h = H::new(ConnConfig { max_request: 1 << 20, ..ConnConfig::default() });
    h.start();
    h.go("");
    let before = h.disk.clone();
    let mut v = h.req_bytes(CMD_WRITE, 0, 2, 0, 2 << 20);
    v.resize(v.len() + (2 << 20), 0x25);
    h.send(&v);
    h.req(CMD_READ, 0, 3, 0, 512);
    assert_eq!(h.reply(2), Err(EINVAL));
    assert_eq!(h.read_reply(3, 0, 512).unwrap(), h.disk[..512], "the payload was read past");
    assert!(h.disk == before, "and never written");
    assert!(!h.conn.is_finished() && !h.conn.is_aborted());
}

#[test]
fn write_over_32_mib_and_the_maximum_is_refused_then_the_connection_closes() {
    let mut h = H::new(ConnConfig { max_request: 1 << 20, ..ConnConfig::default() });
    h.start();
    h.go("");
    h.auto_requests = false;
    h.req(CMD_READ, 0, 1, 0, 512);
    let mut v = h.req_bytes(CMD_WRITE, 0, 2, 0, 33 << 20);
    v.extend_from_slice(&[0x25; 4096]);
    h.send(&v);
    assert_eq!(h.held.len(), 1, "the write never reaches a layer");
    assert!(!h.conn.wants_read(), "its payload is never read");
    assert!(!h.conn.is_finished(), "the READ in flight is answered first");
    h.complete_all();
    assert_eq!(h.reply(2), Err(EINVAL));
    assert_eq!(h.read_reply(1, 0, 512).unwrap(), h.disk[..512]);
    assert!(h.conn.is_finished());
    assert!(!h.conn.is_aborted());
}

#[test]
fn zero_length_read_succeeds() {
    let mut h = H::simple();
    h.req(CMD_READ, 0, 5, 0, 0);
    assert_eq!(h.simple_reply(), (0, 5));
    h.assert_silent();

    let mut h = H::structured();
    h.req(CMD_READ, 0, 5, 0, 0);
    let (c, p) = h.chunk();
    assert_eq!((c.flags, c.typ, c.cookie), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 5));
    assert!(p.is_empty());
}

#[test]
fn bad_request_magic_aborts() {
    let mut h = H::simple();
    let mut v = h.req_bytes(CMD_READ, 0, 1, 0, 512);
    v[0] = 0;
    h.send(&v);
    assert!(h.conn.is_aborted());
    assert!(h.seen.is_empty());
}

#[test]
fn disc_answers_every_request_in_flight_first() {
    let mut h = H::simple();
    h.auto_requests = false;
    let mut v = Vec::new();
    for i in 0..8u64 {
        v.extend(h.req_bytes(CMD_READ, 0, 100 + i, i * 512, 512));
    }
    v.extend(h.req_bytes(CMD_DISC, 0, 999, 0, 0));
    // Anything after DISC is ignored.
    v.extend(h.req_bytes(CMD_READ, 0, 1000, 0, 512));
    h.send(&v);
    assert_eq!(h.held.len(), 8);
    assert!(!h.conn.wants_read());
    // Answer out of order; the connection stays open until the last one.
    for i in (0..8).rev() {
        assert!(!h.conn.is_finished());
        h.complete(i);
    }
    assert!(h.conn.is_finished());
    let mut cookies = Vec::new();
    for _ in 0..8 {
        let (e, c) = h.simple_reply();
        assert_eq!(e, 0);
        let i = c - 100;
        assert_eq!(h.take(512), h.disk[i as usize * 512..][..512]);
        cookies.push(c);
    }
    cookies.sort();
    assert_eq!(cookies, (100..108).collect::<Vec<_>>());
    h.assert_silent();
    assert_eq!(h.budget.used(), 0);
}

#[test]
fn budget_backpressure_stops_reading_and_resumes() {
    let mut h = H::with_budget(ConnConfig::default(), Budget::new(10_000));
    h.start();
    h.go("");
    h.auto_requests = false;
    let mut v = Vec::new();
    for i in 0..3u64 {
        v.extend(h.req_bytes(CMD_READ, 0, i, 0, 4096));
    }
    h.send(&v);
    assert_eq!(h.held.len(), 2);
    assert_eq!(h.budget.used(), 8192);
    assert!(h.conn.waiting_for_budget());
    assert!(!h.conn.wants_read());
    assert!(!h.conn.process(h.now));
    assert_eq!(h.held.len(), 2);
    // Completing a request does not free budget until its reply has been written.
    h.auto_requests = true;
    let r = h.held.remove(0);
    let id = r.id;
    let res = h.execute(r);
    h.conn.handle_result(id, res);
    assert_eq!(h.budget.used(), 8192);
    let _ = h.rx_len(); // writes the reply, releases 4096, and the driver calls process
    assert!(!h.conn.waiting_for_budget());
    assert_eq!(h.seen.len(), 3);
    h.complete_all();
    for _ in 0..3 {
        let (e, c) = h.simple_reply();
        assert_eq!(e, 0);
        assert!(c < 3);
        h.take(4096);
    }
    assert_eq!(h.budget.used(), 0);
    assert!(h.conn.wants_read());
}

/// Connections waiting for budget get it in the order they asked, and one that goes away
/// while waiting does not hold up those behind it.
#[test]
fn budget_goes_to_waiting_connections_first_come_first_served() {
    let budget = Budget::new(8192);
    let open = |budget: &Budget| {
        let mut h = H::with_budget(ConnConfig::default(), budget.clone());
        h.start();
        h.go("");
        h.auto_requests = false;
        h
    };
    let (mut holder, mut first, mut second, mut third) =
        (open(&budget), open(&budget), open(&budget), open(&budget));
    let two = h_reads(&holder, 2);
    holder.send(&two);
    assert_eq!((holder.held.len(), budget.used()), (2, 8192));
    for h in [&mut first, &mut second, &mut third] {
        let one = h_reads(h, 1);
        h.send(&one);
        assert!(h.conn.waiting_for_budget());
    }
    assert_eq!(budget.waiting(), 3);
    // One of the holder's replies leaves: 4096 bytes free, enough for any of the three, but
    // only the first in line may take them.
    let r = holder.held.remove(0);
    let (id, res) = (r.id, holder.execute(r));
    holder.conn.handle_result(id, res);
    let _ = holder.rx_len();
    assert_eq!(budget.used(), 4096);
    assert!(!third.conn.process(third.now) && third.conn.waiting_for_budget(), "third jumped the line");
    assert!(!second.conn.process(second.now) && second.conn.waiting_for_budget(), "second jumped the line");
    first.settle();
    assert!(!first.conn.waiting_for_budget());
    assert_eq!((first.held.len(), budget.used(), budget.waiting()), (1, 8192, 2));
    // The second gives up (its client hangs up): the turn passes to the third.
    drop(second);
    assert_eq!(budget.waiting(), 1);
    let r = holder.held.remove(0);
    let (id, res) = (r.id, holder.execute(r));
    holder.conn.handle_result(id, res);
    let _ = holder.rx_len();
    third.settle();
    assert!(!third.conn.waiting_for_budget());
    assert_eq!((third.held.len(), budget.used(), budget.waiting()), (1, 8192, 0));
}

/// `n` 4 KiB READ requests for `h`.
fn h_reads(h: &H, n: u64) -> Vec<u8> {
    (0..n).flat_map(|i| h.req_bytes(CMD_READ, 0, i, 0, 4096)).collect()
}

#[test]
fn budget_is_released_only_when_the_reply_is_written() {
    let mut h = H::simple();
    h.req(CMD_READ, 0, 1, 0, 65536);
    assert_eq!(h.budget.used(), 65536);
    assert!(h.conn.has_output());
    let mut iov = [std::io::IoSlice::new(&[]); 4];
    let n = h.conn.fill_iovecs(&mut iov);
    assert_eq!(n, 2, "header and data as separate segments");
    assert_eq!((iov[0].len(), iov[1].len()), (16, 65536));
    h.conn.handle_written(16 + 65535);
    assert_eq!(h.budget.used(), 65536);
    h.conn.handle_written(1);
    assert_eq!(h.budget.used(), 0);
    assert!(!h.conn.has_output());
}

#[test]
fn in_flight_cap_stops_reading() {
    let mut h = H::new(ConnConfig { max_in_flight: 2, ..ConnConfig::default() });
    h.start();
    h.go("");
    h.auto_requests = false;
    let mut v = Vec::new();
    for i in 0..5u64 {
        v.extend(h.req_bytes(CMD_FLUSH, 0, i, 0, 0));
    }
    h.send(&v);
    assert_eq!(h.held.len(), 2);
    assert_eq!(h.conn.in_flight(), 2);
    assert!(!h.conn.wants_read());
    assert!(!h.conn.wants_process());
    h.complete(0);
    assert_eq!(h.held.len(), 2);
    h.complete_all();
    assert_eq!(h.seen.len(), 5);
    for i in 0..5 {
        assert_eq!(h.reply(i), Ok(()));
    }
}

#[test]
fn queued_output_cap_stops_reading() {
    let mut h = H::new(ConnConfig { max_queued_reply_bytes: 10_000, ..ConnConfig::default() });
    h.start();
    h.go("");
    let mut v = Vec::new();
    for i in 0..2u64 {
        v.extend(h.req_bytes(CMD_READ, 0, i, 0, 8192));
    }
    // Feed without draining the output: once the replies are queued, reading stops.
    h.feed(&v);
    assert_eq!(h.seen.len(), 2);
    assert!(!h.conn.wants_read());
    assert!(h.conn.read_buf().is_empty());
    let mut v = Vec::new();
    for i in 2..4u64 {
        v.extend(h.req_bytes(CMD_READ, 0, i, 0, 8192));
    }
    h.feed(&v);
    assert_eq!(h.unsent(), v.len());
    assert_eq!(h.seen.len(), 2);
    for i in 0..4 {
        assert_eq!(h.read_reply(i, 0, 8192).unwrap(), h.disk[..8192]);
    }
    assert_eq!(h.seen.len(), 4);
}

#[test]
fn at_most_requests_per_turn_are_decoded_per_call() {
    let mut h = H::simple();
    h.auto_requests = false;
    let mut v = Vec::new();
    for i in 0..(limits::REQUESTS_PER_TURN as u64 + 4) {
        v.extend(h.req_bytes(CMD_FLUSH, 0, i, 0, 0));
    }
    h.feed(&v);
    assert_eq!(h.held.len(), limits::REQUESTS_PER_TURN);
    assert!(h.conn.wants_process());
    assert!(!h.conn.process(h.now));
    h.pump();
    assert_eq!(h.held.len(), limits::REQUESTS_PER_TURN + 4);
    assert!(!h.conn.wants_process());
}

#[test]
fn write_payload_is_read_directly_into_its_buffer() {
    let mut h = H::simple();
    h.auto_requests = false;
    let mut v = h.req_bytes(CMD_WRITE, 0, 1, 0, 100_000);
    v.extend_from_slice(&[7; 1000]);
    h.feed(&v);
    // The header buffer is empty: the next read goes straight into the payload.
    assert_eq!(h.conn.read_buf().len(), 99_000);
    h.feed(&[8; 99_000]);
    assert_eq!(h.held.len(), 1);
    match &h.held[0].op {
        crate::conn::Op::Write { data } => {
            assert_eq!(data.len(), 100_000);
            assert!(data[..1000].iter().all(|&b| b == 7) && data[1000..].iter().all(|&b| b == 8));
        }
        op => panic!("unexpected {op:?}"),
    }
}

#[test]
fn eof_finishes_and_late_results_are_dropped() {
    let mut h = H::simple();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 1, 0, 4096);
    let mut v = h.req_bytes(CMD_WRITE, 0, 2, 0, 4096);
    v.extend_from_slice(&[1; 100]);
    h.send(&v);
    assert_eq!(h.budget.used(), 8192);
    h.eof();
    assert!(h.conn.is_finished());
    assert!(!h.conn.is_aborted());
    assert_eq!(h.budget.used(), 4096, "the partial WRITE's reservation is returned at once");
    h.complete_all();
    h.assert_silent();
    assert_eq!(h.budget.used(), 0);
}

#[test]
fn dropping_the_connection_returns_its_budget() {
    let budget = Budget::new(1 << 20);
    let mut h = H::with_budget(ConnConfig::default(), budget.clone());
    h.start();
    h.go("");
    h.auto_requests = false;
    h.req(CMD_READ, 0, 1, 0, 4096);
    h.req(CMD_READ, 0, 2, 0, 4096);
    h.complete(0);
    assert_eq!(budget.used(), 8192);
    let held = std::mem::take(&mut h.held);
    drop(h);
    assert_eq!(budget.used(), 0);
    drop(held);
}

#[test]
fn shutdown_in_transmission_finishes_requests_in_flight() {
    let mut h = H::simple();
    h.auto_requests = false;
    let before = h.disk.clone();
    h.req(CMD_READ, 0, 1, 0, 512);
    h.conn.shutdown();
    assert!(!h.conn.is_finished());
    // Requests arriving meanwhile are refused with ESHUTDOWN, a WRITE's payload read past.
    h.req(CMD_READ, 0, 2, 0, 512);
    h.write(0, 3, 0, &[0x25; 4096]);
    assert_eq!(h.held.len(), 1, "only the first request reaches a layer");
    assert_eq!(h.reply(2), Err(ESHUTDOWN));
    assert_eq!(h.reply(3), Err(ESHUTDOWN));
    assert!(!h.conn.is_finished());
    h.complete_all();
    assert!(h.conn.is_finished());
    assert_eq!(h.read_reply(1, 0, 512).unwrap(), h.disk[..512]);
    assert!(h.disk == before, "the refused WRITE was never executed");
}

#[test]
fn requests_received_counts_each_request_once_and_not_disc() {
    let mut h = H::simple();
    h.auto_requests = false;
    assert_eq!(h.conn.requests_received(), 0);
    h.req(CMD_READ, 0, 1, 0, 512);
    h.write(0, 2, 0, &[1; 512]);
    h.req(0x55, 0, 3, 0, 0); // refused, but received
    h.req(CMD_DISC, 0, 4, 0, 0);
    assert_eq!(h.conn.requests_received(), 3);
}

#[test]
fn shutdown_with_nothing_in_flight_finishes_at_once() {
    let mut h = H::structured();
    h.conn.shutdown();
    assert!(h.conn.is_finished());
    assert!(!h.conn.is_aborted());
}

#[test]
fn layer_errors_the_spec_reserves_become_einval() {
    // ENOTSUP only for FAST_ZERO, EOVERFLOW only for DF reads (§M item 133).
    let mut h = H::structured();
    h.auto_requests = false;
    h.req(CMD_TRIM, 0, 1, 0, 512);
    h.req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 2, 0, 512);
    h.req(CMD_READ, 0, 3, 0, 512);
    h.req(CMD_READ, CMD_FLAG_DF, 4, 0, 512);
    assert_eq!(h.held.len(), 4);
    let fail = |errno| Err(NbdError::msg(errno, "no"));
    for errno in [Errno::NotSup, Errno::NotSup, Errno::Overflow, Errno::Overflow] {
        h.finish(0, fail(errno));
    }
    for (cookie, want) in [(1, EINVAL), (2, ENOTSUP), (3, EINVAL), (4, EOVERFLOW)] {
        let (c, p) = h.chunk();
        assert_eq!((c.cookie, c.typ), (cookie, REPLY_TYPE_ERROR));
        assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), want, "request {cookie}");
        assert_eq!(&p[6..], b"no", "the message stays");
    }
}

#[test]
fn structured_read_sends_holes() {
    let mut h = H::structured();
    // [4096, 8192) data, [8192, 16384) zero, [16384, 20480) data.
    h.req(CMD_READ, 0, 1, 4096, 16384);
    let chunks: Vec<_> = (0..3).map(|_| h.chunk()).collect();
    let kinds: Vec<_> = chunks.iter().map(|(c, p)| (c.typ, c.flags, c.cookie, p.len())).collect();
    assert_eq!(
        kinds,
        vec![
            (REPLY_TYPE_OFFSET_DATA, 0, 1, 8 + 4096),
            (REPLY_TYPE_OFFSET_HOLE, 0, 1, 12),
            (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 1, 8 + 4096),
        ]
    );
    assert_eq!(chunks[0].1[..8], 4096u64.to_be_bytes());
    assert_eq!(chunks[0].1[8..], h.disk[4096..8192]);
    assert_eq!(chunks[1].1, [0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x20, 0]);
    assert_eq!(chunks[2].1[..8], 16384u64.to_be_bytes());
    assert_eq!(chunks[2].1[8..], h.disk[16384..20480]);
    h.assert_silent();

    // Unaligned: only whole aligned blocks become holes.
    h.req(CMD_READ, 0, 2, 8192 + 100, 8192);
    assert_eq!(h.read_reply(2, 8292, 8192).unwrap(), h.disk[8292..8292 + 8192]);

    // DF: a single data chunk, zeroes included.
    h.req(CMD_READ, CMD_FLAG_DF, 3, 4096, 16384);
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, p.len()), (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 8 + 16384));
    assert_eq!(p[8..], h.disk[4096..20480]);
    h.assert_silent();

    // All zeroes: one hole with DONE.
    h.req(CMD_READ, 0, 4, 8192, 8192);
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, p.len()), (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE, 12));
}

#[test]
fn structured_errors_carry_their_message() {
    let mut h = H::structured();
    h.req(CMD_READ, 0, 1, DISK_SIZE as u64, 512);
    assert_eq!(h.read_reply(1, DISK_SIZE as u64, 512), Err((EINVAL, "read out of range".into())));
    // Refused before reaching a layer: still an error chunk for READ.
    h.req(CMD_READ, CMD_FLAG_NO_HOLE, 2, 0, 512);
    let (e, msg) = h.read_reply(2, 0, 512).unwrap_err();
    assert_eq!(e, EINVAL);
    assert!(msg.contains("NO_HOLE"), "{msg}");
    // A non-READ success may be a simple reply under structured replies.
    h.req(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(h.simple_reply(), (0, 3));
    h.write(0, 4, DISK_SIZE as u64, &[1]);
    assert_eq!(h.reply(4), Err(ENOSPC));
}

#[test]
fn extended_headers_round_trip() {
    let mut h = H::extended();
    h.write(0, 1, 512, &[9; 1024]);
    assert_eq!(h.reply(1), Ok(()));
    h.req(CMD_READ, 0, 2, 512, 1024);
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, c.offset, c.len), (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 512, 8 + 1024));
    assert_eq!(p[..8], 512u64.to_be_bytes());
    assert!(p[8..].iter().all(|&b| b == 9));
    // Holes in extended form: the header echoes the request offset, the payload has the
    // chunk's own offset.
    h.req(CMD_READ, 0, 3, 4096, 16384);
    assert_eq!(h.read_reply(3, 4096, 16384).unwrap(), h.disk[4096..20480]);
    // Never a simple reply, not even for FLUSH.
    h.req(CMD_FLUSH, 0, 4, 0, 0);
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, c.cookie, p.len()), (REPLY_TYPE_NONE, REPLY_FLAG_DONE, 4, 0));
    // 64-bit effect lengths pass through.
    h.req(CMD_TRIM, 0, 5, 0, 1 << 40);
    assert_eq!(h.reply(5), Ok(()));
    assert_eq!(h.seen.last().unwrap().3, 1 << 40);
    // WRITE without PAYLOAD_LEN (qemu 10's client): the data follows all the same.
    let mut v = h.req_bytes(CMD_WRITE, 0, 6, 0, 512);
    v.extend_from_slice(&[0x42; 512]);
    h.send(&v);
    assert_eq!(h.reply(6), Ok(()));
    // PAYLOAD_LEN on another command: the payload is consumed, then EINVAL.
    let mut v = h.req_bytes(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 7, 0, 64);
    v.extend_from_slice(&[0x21; 64]);
    h.send(&v);
    assert_eq!(h.reply(7), Err(EINVAL));
    h.req(CMD_FLUSH, 0, 8, 0, 0);
    assert_eq!(h.reply(8), Ok(()));
    // A payload over the maximum: EINVAL, then close.
    h.req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 9, 0, 1 << 40);
    assert_eq!(h.reply(9), Err(EINVAL));
    assert!(h.conn.is_finished());

    // A compact header after extended headers were negotiated.
    let mut h = H::extended();
    h.ext = false;
    h.req(CMD_FLUSH, 0, 1, 0, 0);
    assert!(!h.conn.is_aborted(), "28 bytes are not yet a 32-byte header");
    h.req(CMD_FLUSH, 0, 2, 0, 0);
    assert!(h.conn.is_aborted());
}

#[test]
fn block_status_compact() {
    let mut h = H::structured();
    h.req(CMD_BLOCK_STATUS, 0, 1, 0, 16384);
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, c.cookie), (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, 1));
    // Context 1; the third extent starts before the requested end, and may run past it.
    let mut want = vec![0, 0, 0, 1];
    for (l, s) in [(4096u32, 0u32), (4096, 3), (DISK_SIZE as u32 - 8192, 0)] {
        want.extend_from_slice(&l.to_be_bytes());
        want.extend_from_slice(&s.to_be_bytes());
    }
    assert_eq!(p, want);

    // REQ_ONE: exactly one descriptor, no longer than requested.
    h.req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 0, 100);
    let (_, p) = h.chunk();
    assert_eq!(p, [0, 0, 0, 1, 0, 0, 0, 100, 0, 0, 0, 0]);
    assert_eq!(h.seen.last().unwrap().2, Flags::REQ_ONE);

    // An extent longer than 32 bits is split on 4 KiB boundaries, only as far as needed.
    h.extents = Extents(vec![Extent { length: 6 << 30, flags: 3 }]);
    h.req(CMD_BLOCK_STATUS, 0, 3, 0, u64::from(u32::MAX));
    let (_, p) = h.chunk();
    assert_eq!(p.len(), 4 + 16);
    assert_eq!(p[4..12], [0xff, 0xff, 0xf0, 0, 0, 0, 0, 3]);
    assert_eq!(p[12..20], [0x80, 0, 0x10, 0, 0, 0, 0, 3]);

    // A layer answering with nothing is an internal error, not a malformed chunk.
    h.extents = Extents::new();
    h.req(CMD_BLOCK_STATUS, 0, 4, 0, 512);
    assert_eq!(h.reply(4), Err(EIO));
}

#[test]
fn block_status_extended() {
    let mut h = H::extended();
    h.extents = Extents(vec![Extent { length: 6 << 30, flags: 2 }]);
    h.req(CMD_BLOCK_STATUS, 0, 1, 4096, 8 << 30);
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, c.offset, c.len), (REPLY_TYPE_BLOCK_STATUS_EXT, REPLY_FLAG_DONE, 4096, 24));
    assert_eq!(p[..8], [0, 0, 0, 1, 0, 0, 0, 1]);
    assert_eq!(p[8..16], (6u64 << 30).to_be_bytes());
    assert_eq!(p[16..24], 2u64.to_be_bytes());
}

#[test]
fn block_status_needs_a_context_for_this_export() {
    // Structured replies but no context selected.
    let mut h = H::default_h();
    h.start();
    h.negotiate_sr();
    h.go("");
    h.req(CMD_BLOCK_STATUS, 0, 1, 0, 512);
    assert_eq!(h.reply(1), Err(EINVAL));

    // Selected for another export than the one chosen by GO.
    let mut h = H::default_h();
    h.start();
    h.negotiate_sr();
    h.opt(OPT_SET_META_CONTEXT, &encode_meta_context_request("other", &[BASE_ALLOCATION]));
    assert_eq!(h.opt_replies().len(), 2);
    h.go("");
    h.req(CMD_BLOCK_STATUS, 0, 1, 0, 512);
    assert_eq!(h.reply(1), Err(EINVAL));
    assert!(h.seen.is_empty());

    // A failed SET clears an earlier selection.
    let mut h = H::default_h();
    h.start();
    h.negotiate_sr();
    h.opt(OPT_SET_META_CONTEXT, &encode_meta_context_request("", &[BASE_ALLOCATION]));
    assert_eq!(h.opt_replies().len(), 2);
    h.opt_expect(OPT_SET_META_CONTEXT, &[0, 0, 0, 9], REP_ERR_INVALID);
    h.go("");
    h.req(CMD_BLOCK_STATUS, 0, 1, 0, 512);
    assert_eq!(h.reply(1), Err(EINVAL));

    // Selected for the export, but then EXPORT_NAME without... the same export works.
    let mut h = H::default_h();
    h.start();
    h.negotiate_sr();
    h.opt(OPT_SET_META_CONTEXT, &encode_meta_context_request("other", &[BASE_ALLOCATION]));
    assert_eq!(h.opt_replies().len(), 2);
    h.opt(OPT_EXPORT_NAME, b"other");
    h.take(10);
    h.req(CMD_BLOCK_STATUS, 0, 1, 0, 512);
    let (c, _) = h.chunk();
    assert_eq!(c.typ, REPLY_TYPE_BLOCK_STATUS);
}

#[test]
fn mismatched_layer_results_become_eio() {
    let mut h = H::structured();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 1, 0, 512);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Data(vec![0; 100])));
    assert_eq!(h.read_reply(1, 0, 512).unwrap_err().0, EIO);
    // An unknown id is ignored.
    h.conn.handle_result(crate::conn::RequestId(12345), Ok(Outcome::Done));
    h.assert_silent();
}

/// Answer the held READ with lent pieces: a page shared with the "layer", then a hole, then the
/// start of the page again.
fn lent_pieces(page: &crate::layer::SharedBytes) -> Vec<Lent> {
    vec![
        Lent::Bytes { page: page.clone(), start: 100, end: 4196 },
        Lent::Zero(4096),
        Lent::Zero(4096),
        Lent::Bytes { page: page.clone(), start: 0, end: 4096 },
    ]
}

fn lent_expected(page: &[u8]) -> Vec<u8> {
    let mut want = page[100..4196].to_vec();
    want.extend_from_slice(&[0; 8192]);
    want.extend_from_slice(&page[..4096]);
    want
}

#[test]
fn lent_read_data_goes_out_in_every_reply_form() {
    let page = std::sync::Arc::new((0..8192u32).map(|i| (i % 251) as u8 + 1).collect::<Vec<u8>>());
    let want = lent_expected(&page);

    // Simple replies: the header, then the pieces, holes as zero bytes.
    let mut h = H::simple();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 1, 4096, 16384);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(lent_pieces(&page).into())));
    assert_eq!(h.simple_reply(), (0, 1));
    assert_eq!(h.take(16384), want);
    h.assert_silent();

    // Structured: one data chunk, one hole chunk for both zero pieces, one data chunk.
    let mut h = H::structured();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 2, 4096, 16384);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(lent_pieces(&page).into())));
    let chunks: Vec<_> = (0..3).map(|_| h.chunk()).collect();
    let kinds: Vec<_> = chunks.iter().map(|(c, p)| (c.typ, c.flags, p.len())).collect();
    assert_eq!(
        kinds,
        vec![
            (REPLY_TYPE_OFFSET_DATA, 0, 8 + 4096),
            (REPLY_TYPE_OFFSET_HOLE, 0, 12),
            (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 8 + 4096),
        ]
    );
    assert_eq!(chunks[0].1[..8], 4096u64.to_be_bytes());
    assert_eq!(chunks[0].1[8..], want[..4096]);
    assert_eq!(chunks[1].1, [0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x20, 0]);
    assert_eq!(chunks[2].1[..8], (4096u64 + 12288).to_be_bytes());
    assert_eq!(chunks[2].1[8..], want[12288..]);
    h.assert_silent();

    // Structured with DF: a single data chunk, the hole as zero bytes.
    h.req(CMD_READ, CMD_FLAG_DF, 3, 4096, 16384);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(lent_pieces(&page).into())));
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, p.len()), (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 8 + 16384));
    assert_eq!(p[8..], want);
    h.assert_silent();

    // Extended headers read back the same bytes.
    let mut h = H::extended();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 4, 4096, 16384);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(lent_pieces(&page).into())));
    assert_eq!(h.read_reply(4, 4096, 16384).unwrap(), want);

    // All holes: one hole chunk with DONE.
    let mut h = H::structured();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 5, 0, 65536 + 512);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(vec![Lent::Zero(65536), Lent::Zero(512)].into())));
    let (c, p) = h.chunk();
    assert_eq!((c.typ, c.flags, p.len()), (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE, 12));
    // And without structured replies, more zeroes than the shared zero page holds.
    let mut h = H::simple();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 6, 0, 65536 + 512);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(vec![Lent::Zero(65536), Lent::Zero(512)].into())));
    assert_eq!(h.simple_reply(), (0, 6));
    assert!(h.take(65536 + 512).iter().all(|&b| b == 0));
    h.assert_silent();
}

#[test]
fn lent_data_of_the_wrong_length_becomes_eio() {
    let mut h = H::structured();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 1, 0, 512);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(vec![Lent::Zero(511)].into())));
    assert_eq!(h.read_reply(1, 0, 512).unwrap_err().0, EIO);
}

#[test]
fn lent_file_ranges_go_out_between_the_other_bytes() {
    let dir = std::env::temp_dir().join(format!("bs-lent-file-{}", std::process::id()));
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 249) as u8).collect();
    std::fs::write(&dir, &data).unwrap();
    let file = std::sync::Arc::new(std::fs::File::open(&dir).unwrap());
    let _ = std::fs::remove_file(&dir);
    let page = std::sync::Arc::new(vec![7u8; 4096]);
    let pieces = vec![
        Lent::File { file: file.clone(), offset: 1000, len: 70_000 },
        Lent::Zero(4096),
        Lent::Bytes { page, start: 0, end: 4096 },
    ];
    let mut want = data[1000..71_000].to_vec();
    want.extend_from_slice(&[0; 4096]);
    want.extend_from_slice(&[7; 4096]);

    // Simple reply: header, the file range (sent apart from the iovecs), zeroes, the page.
    let mut h = H::simple();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 1, 0, want.len() as u64);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(pieces.clone().into())));
    assert_eq!(h.simple_reply(), (0, 1));
    assert_eq!(h.take(want.len()), want);
    assert!(h.file_sends >= 2, "the file range went out by itself, in parts");
    h.assert_silent();

    // Structured: the file range is data, in one chunk with the page after the hole.
    let mut h = H::structured();
    h.auto_requests = false;
    h.req(CMD_READ, 0, 2, 0, want.len() as u64);
    let r = h.held.remove(0);
    h.conn.handle_result(r.id, Ok(Outcome::Lent(pieces.into())));
    assert_eq!(h.read_reply(2, 0, want.len()).unwrap(), want);
}
