//! Greeting, client flags and every option.

use std::time::Duration;

use super::harness::*;
use crate::conn::ConnConfig;
use crate::error::{Errno, NbdError};
use crate::layer::{BlockSize, ExportInfo};
use crate::proto::*;

#[test]
fn export_name_with_no_zeroes() {
    let mut h = H::default_h();
    assert!(h.conn.poll_deadline().is_some());
    assert_eq!(h.greeting(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    h.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    h.opt(OPT_EXPORT_NAME, b"other");
    assert_eq!(h.opened, vec![("other".to_string(), false)]);
    let r = h.take(10);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), DISK_SIZE as u64);
    let flags = u16::from_be_bytes([r[8], r[9]]);
    // No SR negotiated: everything but DF.
    assert_eq!(flags, 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400 | 0x0800);
    h.assert_silent();
    assert!(h.conn.in_transmission());
    assert!(h.conn.poll_deadline().is_none());
}

#[test]
fn export_name_without_no_zeroes_sends_124_zeroes() {
    let mut h = H::default_h();
    h.greeting();
    h.client_flags(FLAG_C_FIXED_NEWSTYLE);
    h.opt(OPT_EXPORT_NAME, b"");
    let r = h.take(10 + 124);
    assert!(r[10..].iter().all(|&b| b == 0));
    h.assert_silent();
    assert!(h.conn.in_transmission());
}

#[test]
fn export_name_failures_hard_disconnect() {
    // Unknown export.
    let mut h = H::default_h();
    h.start();
    h.opt(OPT_EXPORT_NAME, b"nope");
    assert!(h.conn.is_aborted());
    assert!(!h.conn.has_output());

    // A name over 4096 bytes is refused from the header alone, before its data arrives.
    let mut h = H::default_h();
    h.start();
    let mut v = Vec::new();
    encode_option_request(&mut v, OPT_EXPORT_NAME, &vec![b'x'; 4097]);
    h.send(&v[..16]);
    assert!(h.conn.is_aborted());
    assert!(h.opened.is_empty());

    // Invalid UTF-8.
    let mut h = H::default_h();
    h.start();
    h.opt(OPT_EXPORT_NAME, b"\xff\xfe");
    assert!(h.conn.is_aborted());

    // After extended headers.
    let mut h = H::default_h();
    h.start();
    h.negotiate_ext();
    h.opt(OPT_EXPORT_NAME, b"");
    assert!(h.conn.is_aborted());
    assert!(h.opened.is_empty());
}

#[test]
fn bad_client_flags_abort() {
    for (advertised, client, ok) in [
        (3u16, 4u32, false),
        (3, 0x8000_0001, false),
        (1, 3, false), // C_NO_ZEROES without NO_ZEROES
        (0, 1, false), // C_FIXED_NEWSTYLE without FIXED_NEWSTYLE
        (1, 1, true),
        (3, 0, true),
        (0, 0, true),
    ] {
        let cfg = ConnConfig { handshake_flags: advertised, ..ConnConfig::default() };
        let mut h = H::new(cfg);
        assert_eq!(h.greeting(), advertised);
        h.client_flags(client);
        assert_eq!(h.conn.is_aborted(), !ok, "advertised {advertised:#x}, client {client:#x}");
        if !ok {
            assert!(h.conn.abort_reason().is_some());
            assert!(!h.conn.wants_read());
        }
    }
    // Bits beyond the two defined ones are never advertised, whatever the mask.
    let mut h = H::new(ConnConfig { handshake_flags: 0xffff, ..ConnConfig::default() });
    assert_eq!(h.greeting(), 3);
}

#[test]
fn bad_option_magic_aborts() {
    let mut h = H::default_h();
    h.start();
    let mut v = Vec::new();
    encode_option_request(&mut v, OPT_LIST, &[]);
    v[7] ^= 1;
    h.send(&v);
    assert!(h.conn.is_aborted());
    assert_eq!(h.list_requests, 0);
}

#[test]
fn info_then_go_agree() {
    let mut h = H::default_h();
    h.start();
    h.negotiate_sr();
    let req = encode_info_request("other", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 999]);
    h.opt(OPT_INFO, &req);
    let info = h.opt_replies();
    assert!(!h.conn.in_transmission());
    h.opt(OPT_GO, &req);
    let go = h.opt_replies();
    assert_eq!(h.opened, vec![("other".to_string(), true), ("other".to_string(), false)]);
    assert!(h.conn.in_transmission());
    h.assert_silent(); // never the 124 zeroes after GO

    let payloads = |r: &Vec<(u32, u32, Vec<u8>)>, code| {
        assert!(r.iter().all(|x| x.0 == code));
        r.iter().map(|x| (x.1, x.2.clone())).collect::<Vec<_>>()
    };
    assert_eq!(payloads(&info, OPT_INFO), payloads(&go, OPT_GO));
    let items = payloads(&go, OPT_GO);
    assert_eq!(items.len(), 5);
    let flags = u16::from_be_bytes([items[0].1[10], items[0].1[11]]);
    assert_eq!(items[0].1[..10], [0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
    assert_ne!(flags & FLAG_SEND_DF, 0, "DF after structured replies");
    assert_eq!(items[1].1, b"\x00\x01other");
    assert_eq!(items[2].1, b"\x00\x02a test disk");
    let bs = &items[3].1;
    assert_eq!(bs.len(), 14);
    assert_eq!(&bs[..2], &[0, 3]);
    let word = |i: usize| u32::from_be_bytes(bs[2 + 4 * i..6 + 4 * i].try_into().unwrap());
    assert_eq!((word(0), word(1), word(2)), (1, 4096, crate::limits::MAX_REQUEST_BYTES));
    assert_eq!(items[4], (REP_ACK, vec![]));
}

#[test]
fn block_size_is_sent_unasked_when_the_export_needs_alignment() {
    let mut h = H::default_h();
    let mut info = rw_info(1 << 20);
    info.block_size = Some(BlockSize { minimum: 512, preferred: 4096, maximum: 1 << 20 });
    h.exports.push(("direct".into(), info));
    h.start();
    h.opt(OPT_INFO, &encode_info_request("direct", &[]));
    let r = h.opt_replies();
    assert_eq!(r.len(), 3);
    assert_eq!(r[1].2, [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x10, 0, 0]);
}

#[test]
fn block_size_is_sent_unasked_when_the_maximum_is_under_32_mib() {
    // The default maximum (64 MiB) is looser than the spec's default (32 MiB): nothing unasked.
    let mut h = H::default_h();
    h.start();
    h.opt(OPT_INFO, &encode_info_request("", &[]));
    assert_eq!(h.opt_replies().len(), 2, "INFO_EXPORT and ACK");
    // `--max-request 1M` is stricter than the default: the client must be told.
    let mut h = H::new(ConnConfig { max_request: 1 << 20, ..ConnConfig::default() });
    h.start();
    h.opt(OPT_GO, &encode_info_request("", &[]));
    let r = h.opt_replies();
    assert_eq!(r.len(), 3);
    assert_eq!(r[1].2, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0x10, 0, 0]);
}

#[test]
fn go_to_an_unknown_export_fails_and_negotiation_continues() {
    let mut h = H::default_h();
    h.start();
    h.opt(OPT_GO, &encode_info_request("nope", &[]));
    let r = h.opt_replies();
    assert_eq!(r.len(), 1, "no INFO replies before UNKNOWN");
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert_eq!(r[0].2, b"no export named \"nope\"");
    assert!(!h.conn.in_transmission());
    h.go("");
}

#[test]
fn list_exports() {
    let mut h = H::default_h();
    h.start();
    h.opt(OPT_LIST, &[]);
    let r = h.opt_replies();
    assert_eq!(r.len(), 3);
    assert_eq!((r[0].0, r[0].1, r[0].2.clone()), (OPT_LIST, REP_SERVER, vec![0, 0, 0, 0]));
    assert_eq!(r[1].2, b"\x00\x00\x00\x05otherthe other one");
    assert_eq!(r[2].1, REP_ACK);
}

#[test]
fn list_with_data_gets_a_single_invalid() {
    let mut h = H::default_h();
    h.start();
    // LIST with data, pipelined with ABORT.
    let mut v = Vec::new();
    encode_option_request(&mut v, OPT_LIST, b"junk");
    encode_option_request(&mut v, OPT_ABORT, &[]);
    h.send(&v);
    assert_eq!(h.opt_reply().1, REP_ERR_INVALID);
    assert_eq!(h.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    h.assert_silent();
    assert_eq!(h.list_requests, 0);
    assert!(h.conn.is_finished());
}

#[test]
fn abort_acks_then_finishes() {
    let mut h = H::default_h();
    h.start();
    h.opt(OPT_ABORT, b"ignored data");
    assert_eq!(h.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(h.conn.is_finished());
    assert!(!h.conn.is_aborted());
    assert!(!h.conn.wants_read());
}

#[test]
fn unknown_options_are_skipped_exactly() {
    let mut h = H::default_h();
    h.start();
    let mut v = Vec::new();
    encode_option_request(&mut v, OPT_PEEK_EXPORT, &[0x49; 100]);
    encode_option_request(&mut v, 0x1234_5678, &vec![0x55; 3 << 20]);
    encode_option_request(&mut v, OPT_GO, &encode_info_request("", &[]));
    h.send(&v);
    let (o, t, msg) = h.opt_reply();
    assert_eq!((o, t), (OPT_PEEK_EXPORT, REP_ERR_UNSUP));
    assert!(!msg.is_empty());
    assert_eq!(h.opt_reply().1, REP_ERR_UNSUP);
    assert_eq!(h.opt_replies().last().unwrap().1, REP_ACK);
    assert!(h.conn.in_transmission());
}

#[test]
fn malformed_info_and_go_are_invalid() {
    let mut h = H::default_h();
    h.start();
    let good = encode_info_request("", &[INFO_NAME]);
    // Name length greater than optlen - 6.
    let mut bad = good.clone();
    bad[3] = 1;
    h.opt_expect(OPT_GO, &bad, REP_ERR_INVALID);
    // Info count that does not match.
    let mut bad = good.clone();
    bad[5] = 2;
    h.opt_expect(OPT_GO, &bad, REP_ERR_INVALID);
    // Trailing junk, truncated, empty.
    h.opt_expect(OPT_INFO, &[good.clone(), vec![0]].concat(), REP_ERR_INVALID);
    h.opt_expect(OPT_INFO, &good[..5], REP_ERR_INVALID);
    h.opt_expect(OPT_INFO, &[], REP_ERR_INVALID);
    // A name over 4096 bytes, even though it fits in the option.
    h.opt_expect(OPT_GO, &encode_info_request(&"n".repeat(4097), &[]), REP_ERR_INVALID);
    // Longer than any valid INFO could be: skipped, not buffered.
    h.opt_expect(OPT_GO, &vec![0u8; 200_000], REP_ERR_INVALID);
    assert!(h.opened.is_empty());
    assert!(!h.conn.is_aborted());
    h.go("");
}

#[test]
fn starttls_is_refused() {
    let mut h = H::default_h();
    h.start();
    let msg = h.opt_expect(OPT_STARTTLS, &[], REP_ERR_POLICY);
    assert!(!msg.is_empty());
    h.opt_expect(OPT_STARTTLS, b"x", REP_ERR_INVALID);
    h.go("");
}

#[test]
fn structured_and_extended_negotiation_rules() {
    let mut h = H::default_h();
    h.start();
    h.opt_expect(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    h.opt_expect(OPT_EXTENDED_HEADERS, b"x", REP_ERR_INVALID);
    h.negotiate_sr();
    h.negotiate_sr(); // a repeat is acknowledged again
    h.negotiate_ext();
    h.opt_expect(OPT_STRUCTURED_REPLY, &[], REP_ERR_EXT_HEADER_REQD);

    let mut h = H::new(ConnConfig { structured_replies: false, ..ConnConfig::default() });
    h.start();
    h.opt_expect(OPT_STRUCTURED_REPLY, &[], REP_ERR_UNSUP);
    h.opt_expect(OPT_EXTENDED_HEADERS, &[], REP_ERR_UNSUP);
    let (_, flags) = h.go("");
    assert_eq!(flags & FLAG_SEND_DF, 0);

    let mut h = H::new(ConnConfig { extended_headers: false, ..ConnConfig::default() });
    h.start();
    h.opt_expect(OPT_EXTENDED_HEADERS, &[], REP_ERR_UNSUP);
}

#[test]
fn meta_context_negotiation() {
    let mut h = H::default_h();
    h.start();
    let q = |qs: &[&str]| encode_meta_context_request("", qs);
    // SET before structured replies.
    h.opt_expect(OPT_SET_META_CONTEXT, &q(&[BASE_ALLOCATION]), REP_ERR_INVALID);
    // LIST works regardless, and with no queries lists everything.
    h.opt(OPT_LIST_META_CONTEXT, &q(&[]));
    assert_eq!(
        h.opt_replies(),
        vec![
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT, b"\x00\x00\x00\x00base:allocation".to_vec()),
            (OPT_LIST_META_CONTEXT, REP_ACK, vec![]),
        ]
    );
    h.opt(OPT_LIST_META_CONTEXT, &q(&["base:"]));
    assert_eq!(h.opt_replies().len(), 2);
    h.opt(OPT_LIST_META_CONTEXT, &q(&["qemu:dirty-bitmap:a", "base:nothing", "nocolon"]));
    assert_eq!(h.opt_replies(), vec![(OPT_LIST_META_CONTEXT, REP_ACK, vec![])]);
    h.negotiate_sr();
    h.opt(OPT_SET_META_CONTEXT, &q(&["x-foo:bar", BASE_ALLOCATION, BASE_ALLOCATION, "base:"]));
    assert_eq!(
        h.opt_replies(),
        vec![
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT, b"\x00\x00\x00\x01base:allocation".to_vec()),
            (OPT_SET_META_CONTEXT, REP_ACK, vec![]),
        ]
    );
    // Zero queries select nothing.
    h.opt(OPT_SET_META_CONTEXT, &q(&[]));
    assert_eq!(h.opt_replies(), vec![(OPT_SET_META_CONTEXT, REP_ACK, vec![])]);
    // Overrunning lengths.
    let mut bad = q(&[BASE_ALLOCATION]);
    bad[11] = 99;
    h.opt_expect(OPT_LIST_META_CONTEXT, &bad, REP_ERR_INVALID);
    h.opt_expect(OPT_SET_META_CONTEXT, &bad, REP_ERR_INVALID);
    let too_many: Vec<String> = (0..200).map(|i| format!("x:{i}")).collect();
    let refs: Vec<&str> = too_many.iter().map(|s| s.as_str()).collect();
    h.opt_expect(OPT_LIST_META_CONTEXT, &q(&refs), REP_ERR_TOO_BIG);

    let mut h = H::new(ConnConfig { meta_contexts: false, ..ConnConfig::default() });
    h.start();
    h.negotiate_sr();
    h.opt_expect(OPT_LIST_META_CONTEXT, &q(&[]), REP_ERR_UNSUP);
    h.opt_expect(OPT_SET_META_CONTEXT, &q(&[BASE_ALLOCATION]), REP_ERR_UNSUP);
}

#[test]
fn huge_option_length_aborts() {
    let mut h = H::default_h();
    h.start();
    let mut v = Vec::new();
    encode_option_request(&mut v, 0x99, &[]);
    v[12..16].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    h.send(&v);
    assert!(h.conn.is_aborted());
}

#[test]
fn too_many_options_abort() {
    let mut h = H::new(ConnConfig { max_options: 3, ..ConnConfig::default() });
    h.start();
    for _ in 0..3 {
        h.opt_expect(0x77, &[], REP_ERR_UNSUP);
    }
    h.opt(0x77, &[]);
    assert!(h.conn.is_aborted());
    assert!(!h.conn.has_output());
}

#[test]
fn handshake_deadline() {
    let mut h = H::default_h();
    let t0 = h.now;
    h.start();
    let d = h.conn.poll_deadline().expect("deadline");
    assert_eq!(d, t0 + crate::limits::HANDSHAKE_TIMEOUT);
    h.conn.handle_timeout(t0 + Duration::from_secs(1));
    assert!(!h.conn.is_aborted());
    h.conn.handle_timeout(d);
    assert!(h.conn.is_aborted());
    assert!(h.conn.abort_reason().unwrap().0.contains("handshake"));

    let mut h = H::new(ConnConfig { handshake_timeout: None, ..ConnConfig::default() });
    assert_eq!(h.conn.poll_deadline(), None);
    h.start();
    h.go("");
    assert_eq!(h.conn.poll_deadline(), None);
}

#[test]
fn shutdown_during_the_handshake() {
    let mut h = H::default_h();
    h.start();
    h.conn.shutdown();
    h.opt_expect(OPT_GO, &encode_info_request("", &[]), REP_ERR_SHUTDOWN);
    h.opt_expect(OPT_LIST, &[], REP_ERR_SHUTDOWN);
    h.opt_expect(0x55, b"data", REP_ERR_SHUTDOWN);
    h.opt_expect(OPT_ABORT, &[], REP_ACK);
    assert!(h.opened.is_empty());
    assert!(h.conn.is_finished());
}

#[test]
fn pipelined_options_wait_for_the_export() {
    let mut h = H::default_h();
    h.auto_open = false;
    h.start();
    let mut v = Vec::new();
    encode_option_request(&mut v, OPT_INFO, &encode_info_request("other", &[]));
    encode_option_request(&mut v, OPT_LIST, &[]);
    encode_option_request(&mut v, OPT_GO, &encode_info_request("", &[]));
    h.send(&v);
    assert_eq!(h.opened, vec![("other".to_string(), true)]);
    assert_eq!(h.list_requests, 0, "nothing is processed while an open is outstanding");
    h.assert_silent();
    let r = h.open("other");
    h.conn.handle_export(r, h.now);
    h.pump();
    assert_eq!(h.list_requests, 1);
    let l = h.list.clone();
    h.conn.handle_export_list(l);
    h.pump();
    assert_eq!(h.opened.len(), 2);
    let r = h.open("");
    h.conn.handle_export(r, h.now);
    assert_eq!(h.opt_replies().len(), 2); // INFO: export + ACK
    assert_eq!(h.opt_replies().len(), 3); // LIST
    assert_eq!(h.opt_replies().len(), 2); // GO
    assert!(h.conn.in_transmission());
}

#[test]
fn oldstyle() {
    let mut h = H::new(ConnConfig { oldstyle: true, ..ConnConfig::default() });
    assert_eq!(h.opened, Vec::<(String, bool)>::new()); // the event is not pumped yet
    h.pump();
    assert_eq!(h.opened, vec![(String::new(), false)]);
    let g = h.take(152);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], &OLDSTYLE_MAGIC.to_be_bytes());
    assert_eq!(u64::from_be_bytes(g[16..24].try_into().unwrap()), DISK_SIZE as u64);
    assert_eq!(&g[24..26], &[0, 0], "no handshake flags in the upper half");
    assert!(g[28..].iter().all(|&b| b == 0));
    assert!(h.conn.in_transmission());
    h.req(CMD_READ, 0, 42, 0, 16);
    assert_eq!(h.read_reply(42, 0, 16).unwrap(), h.disk[..16]);

    let mut h = H::new(ConnConfig { oldstyle: true, ..ConnConfig::default() });
    h.exports.clear();
    h.pump();
    assert!(h.conn.is_aborted());
}

#[test]
fn transmission_flags_follow_the_export() {
    let mut h = H::default_h();
    h.start();
    let (_, f) = h.go("ro");
    assert_eq!(f, FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN);

    let mut h = H::default_h();
    let mut info = ExportInfo::read_only(1);
    info.can_write = true;
    info.zero = crate::layer::Support::Emulate;
    info.can_fast_zero = false;
    info.is_rotational = true;
    info.can_multi_conn = false;
    h.exports.push(("z".into(), info));
    h.start();
    h.negotiate_sr();
    let (_, f) = h.go("z");
    assert_eq!(f, FLAG_HAS_FLAGS | FLAG_ROTATIONAL | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF);
}

#[test]
fn open_errors_without_message_get_one() {
    let mut h = H::default_h();
    h.auto_open = false;
    h.start();
    h.opt(OPT_INFO, &encode_info_request("x", &[]));
    h.conn.handle_export(Err(NbdError::new(Errno::Io)), h.now);
    let (_, t, msg) = h.opt_reply();
    assert_eq!(t, REP_ERR_UNKNOWN);
    assert_eq!(String::from_utf8(msg).unwrap(), "cannot open export \"x\": EIO");
}
