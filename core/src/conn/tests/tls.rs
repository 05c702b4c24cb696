//! STARTTLS in the state machine (checklist §F): option ordering under `--tls=require`, the
//! hand-over to the driver, forgetting plaintext negotiation, and pipelined plaintext.
//! The harness's bytes after `tls_started` stand for the session's decrypted stream.

use std::time::Duration;

use super::harness::*;
use crate::budget::Budget;
use crate::conn::ConnConfig;
use crate::proto::*;
use crate::tls::TlsPolicy;

fn cfg(tls: TlsPolicy) -> ConnConfig {
    ConnConfig { tls, ..ConnConfig::default() }
}

fn opt_bytes(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_option_request(&mut v, code, data);
    v
}

#[test]
fn require_refuses_every_option_before_starttls() {
    let mut h = H::new(cfg(TlsPolicy::Require));
    h.start();
    let go = encode_info_request("", &[INFO_NAME]);
    let meta = encode_meta_context_request("", &[BASE_ALLOCATION]);
    let cases: Vec<(u32, Vec<u8>)> = vec![
        (OPT_LIST, vec![]),
        (OPT_LIST, b"junk".to_vec()),
        (OPT_INFO, go.clone()),
        (OPT_GO, go),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_LIST_META_CONTEXT, meta.clone()),
        (OPT_SET_META_CONTEXT, meta),
        (OPT_EXTENDED_HEADERS, vec![]),
        (99, vec![1, 2, 3]),
    ];
    for (code, data) in &cases {
        let msg = h.opt_expect(*code, data, REP_ERR_TLS_REQD);
        assert!(!msg.is_empty(), "option {code}: TLS_REQD carries a message");
    }
    // Nothing reached the layers, and the refused options negotiated nothing.
    assert!(h.opened.is_empty());
    assert_eq!(h.list_requests, 0);
    assert!(!h.conn.is_aborted());
    // ABORT is answered normally.
    h.opt_expect(OPT_ABORT, &[], REP_ACK);
    assert!(h.conn.is_finished());
}

#[test]
fn require_export_name_before_tls_disconnects() {
    let mut h = H::new(cfg(TlsPolicy::Require));
    h.start();
    h.opt(OPT_EXPORT_NAME, b"");
    assert!(h.conn.is_aborted());
    assert!(h.opened.is_empty());
    h.assert_silent();
}

#[test]
fn require_without_fixed_newstyle_disconnects() {
    let mut h = H::new(cfg(TlsPolicy::Require));
    assert_eq!(h.greeting(), 3);
    h.client_flags(FLAG_C_NO_ZEROES);
    assert!(h.conn.is_aborted());
}

#[test]
fn selective_tls_without_fixed_newstyle_refuses_starttls() {
    let mut h = H::new(cfg(TlsPolicy::On));
    assert_eq!(h.greeting(), 3);
    h.client_flags(FLAG_C_NO_ZEROES);
    h.opt_expect(OPT_STARTTLS, &[], REP_ERR_POLICY);
    assert_eq!(h.tls_starts, 0);
}

#[test]
fn require_serves_everything_after_starttls() {
    let mut h = H::new(cfg(TlsPolicy::Require));
    h.start();
    h.opt_expect(OPT_STRUCTURED_REPLY, &[], REP_ERR_TLS_REQD);
    h.opt(OPT_STARTTLS, &[]);
    assert_eq!(h.opt_reply().1, REP_ACK);
    assert_eq!(h.tls_starts, 1);
    // Until the driver says the session is in place, the connection reads nothing.
    assert!(!h.conn.wants_read());
    assert!(h.conn.read_buf().is_empty());
    assert!(!h.conn.is_tls());
    h.tls_started();
    assert!(h.conn.is_tls());
    h.opt(OPT_LIST, &[]);
    assert_eq!(h.opt_replies().last().map(|r| r.1), Some(REP_ACK));
    // A second STARTTLS is INVALID, never TLS_REQD (§F item 75).
    h.opt_expect(OPT_STARTTLS, &[], REP_ERR_INVALID);
    h.negotiate_sr();
    h.go("");
    h.req(CMD_READ, 0, 7, 0, 512);
    assert_eq!(h.read_reply(7, 0, 512).expect("read"), h.disk[..512]);
}

#[test]
fn starttls_forgets_plaintext_negotiation() {
    // CVE-2021-3716: STRUCTURED_REPLY and a meta context negotiated in plaintext (perhaps by a
    // man in the middle) must not survive into the TLS session.
    let mut h = H::new(cfg(TlsPolicy::On));
    h.start();
    h.negotiate_sr();
    h.opt(OPT_SET_META_CONTEXT, &encode_meta_context_request("", &[BASE_ALLOCATION]));
    assert_eq!(h.opt_replies().len(), 2);
    h.starttls();
    let (_, flags) = h.go("");
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF requires structured replies, which were forgotten");
    // Replies are simple, and block status was not negotiated.
    h.req(CMD_READ, 0, 1, 0, 4096);
    let data = h.read_reply(1, 0, 4096).expect("read");
    assert_eq!(data, h.disk[..4096]);
    h.req(CMD_BLOCK_STATUS, 0, 2, 0, 4096);
    assert_eq!(h.reply(2), Err(EINVAL));
}

#[test]
fn starttls_forgets_extended_headers() {
    let mut h = H::new(cfg(TlsPolicy::On));
    h.start();
    h.negotiate_ext();
    h.starttls();
    // EXPORT_NAME is a hard error once extended headers are on; after TLS they are not.
    h.opt(OPT_EXPORT_NAME, b"");
    assert!(!h.conn.is_aborted());
    let _reply = h.take(10);
    assert!(h.conn.in_transmission());
    h.req(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(h.reply(5), Ok(()));
}

#[test]
fn plaintext_pipelined_after_starttls_is_never_processed() {
    for policy in [TlsPolicy::On, TlsPolicy::Require] {
        let mut h = H::new(cfg(policy));
        h.start();
        // STARTTLS and, in the same segment, options a man in the middle appended.
        let mut b = opt_bytes(OPT_STARTTLS, &[]);
        b.extend(opt_bytes(OPT_STRUCTURED_REPLY, &[]));
        b.extend(opt_bytes(OPT_GO, &encode_info_request("", &[])));
        h.send(&b);
        assert!(h.conn.is_aborted(), "{policy:?}: pipelined plaintext drops the connection");
        assert_eq!(h.tls_starts, 0);
        assert!(h.opened.is_empty(), "{policy:?}: the GO behind STARTTLS was acted on");
        h.assert_silent();
    }
}

#[test]
fn starttls_with_data_is_invalid_and_off_is_policy() {
    let mut h = H::new(cfg(TlsPolicy::On));
    h.start();
    h.opt_expect(OPT_STARTTLS, b"x", REP_ERR_INVALID);
    assert_eq!(h.tls_starts, 0);
    let mut h = H::new(cfg(TlsPolicy::Require));
    h.start();
    h.opt_expect(OPT_STARTTLS, b"xyz", REP_ERR_INVALID);
    let mut h = H::new(cfg(TlsPolicy::Off));
    h.start();
    h.opt_expect(OPT_STARTTLS, &[], REP_ERR_POLICY);
    h.go("");
}

#[test]
fn selective_tls_serves_plaintext_clients() {
    let mut h = H::new(cfg(TlsPolicy::On));
    h.start();
    h.negotiate_sr();
    h.opt(OPT_LIST, &[]);
    assert_eq!(h.opt_replies().last().map(|r| r.1), Some(REP_ACK));
    h.go("");
    assert!(!h.conn.is_tls());
}

#[test]
fn a_tls_session_is_paid_from_the_budget() {
    let session = 100_000;
    let budget = Budget::new(150_000);
    let c = ConnConfig { tls_session_budget: session, ..cfg(TlsPolicy::On) };
    let mut a = H::with_budget(c.clone(), budget.clone());
    a.start();
    a.starttls();
    assert_eq!(budget.used(), session);
    // No room for a second session: refused, and that client can carry on in plaintext.
    let mut b = H::with_budget(c, budget.clone());
    b.start();
    let msg = b.opt_expect(OPT_STARTTLS, &[], REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&msg).contains("memory"));
    b.go("");
    drop(a);
    assert_eq!(budget.used(), 0, "the session's budget comes back when the connection goes");
}

#[test]
fn the_handshake_deadline_covers_tls() {
    let c = ConnConfig { handshake_timeout: Some(Duration::from_secs(5)), ..cfg(TlsPolicy::Require) };
    let mut h = H::new(c);
    h.start();
    h.opt(OPT_STARTTLS, &[]);
    assert_eq!(h.opt_reply().1, REP_ACK);
    let d = h.conn.poll_deadline().expect("a deadline while STARTTLS is pending");
    h.tls_started();
    assert_eq!(h.conn.poll_deadline(), Some(d), "the TLS handshake runs under the same deadline");
    h.conn.handle_timeout(d);
    assert!(h.conn.is_aborted());
}

#[test]
fn shutdown_refuses_starttls() {
    let mut h = H::new(cfg(TlsPolicy::Require));
    h.start();
    h.conn.shutdown();
    h.opt_expect(OPT_STARTTLS, &[], REP_ERR_SHUTDOWN);
    assert_eq!(h.tls_starts, 0);
}
