//! The handshake: client flags, option haggling, and the way into transmission (EXPORT_NAME,
//! GO, oldstyle).

use super::{AfterSkip, Conn, Event, Export, InState, Pending, Phase, TlsState};
use crate::error::{Errno, NbdError};
use crate::layer::registry::ExportDesc;
use crate::layer::{ExportInfo, Support};
use crate::limits;
use crate::proto::*;
use crate::tls::TlsPolicy;

/// Largest INFO/GO data that can be valid: name length, a 4096-byte name, the count and 65535
/// info requests. Anything longer is malformed and skipped rather than buffered.
const MAX_INFO_DATA: u32 = 4 + MAX_STRING_LEN as u32 + 2 + 2 * u16::MAX as u32;

/// Largest LIST/SET_META_CONTEXT data we buffer: the name plus `MAX_META_QUERIES` maximal
/// queries. Longer requests are answered TOO_BIG without being buffered.
const MAX_META_DATA: u32 =
    4 + MAX_STRING_LEN as u32 + 4 + limits::MAX_META_QUERIES * (4 + MAX_STRING_LEN as u32);

/// Hard ceiling on the advertised maximum payload: keeps every data chunk's 32-bit length field
/// (payload + 8) in range, and READ buffers allocatable.
const PAYLOAD_CEILING: u32 = 1 << 31;

/// Largest minimum block size the spec allows.
const MAX_MIN_BLOCK: u32 = 64 * 1024;

impl Conn {
    pub(super) fn client_flags(&mut self, flags: u32) {
        if flags & !CLIENT_FLAGS_KNOWN != 0 {
            return self.abort(format!("client flags {flags:#x} have unknown bits set"));
        }
        // Client flag bits mirror the handshake flag bits; echoing one we did not offer is as bad.
        if flags & !u32::from(self.handshake_flags) != 0 {
            return self.abort(format!(
                "client flags {flags:#x} set a flag the server did not advertise ({:#x})",
                self.handshake_flags
            ));
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.fixed_newstyle = flags & FLAG_C_FIXED_NEWSTYLE != 0;
        if self.cfg.tls == TlsPolicy::Require && !self.fixed_newstyle {
            // Without fixed newstyle there is no STARTTLS (§F item 71), so nothing this client
            // can send would be served.
            return self.abort("TLS is required, and the client did not set C_FIXED_NEWSTYLE".into());
        }
        self.phase = Phase::Options;
    }

    pub(super) fn option_header(&mut self, h: OptionHeader) {
        self.options_seen = self.options_seen.saturating_add(1);
        if self.options_seen > self.cfg.max_options {
            return self.abort(format!("more than {} options", self.cfg.max_options));
        }
        if h.len > self.cfg.max_option_bytes {
            return self.abort(format!(
                "option {} declares {} bytes of data (limit {})",
                h.code, h.len, self.cfg.max_option_bytes
            ));
        }
        let (code, len) = (h.code, h.len);
        // FORCEDTLS before TLS (§F item 73): only ABORT and STARTTLS are served.
        let tls_required = self.cfg.tls == TlsPolicy::Require && self.tls != TlsState::Active;
        match code {
            OPT_EXPORT_NAME => {
                // This option has no error reply: every failure is a hard disconnect.
                if tls_required {
                    return self.abort("NBD_OPT_EXPORT_NAME before STARTTLS, and TLS is required".into());
                }
                if self.extended {
                    return self.abort("NBD_OPT_EXPORT_NAME after extended headers were negotiated".into());
                }
                if self.shutting_down {
                    return self.abort("NBD_OPT_EXPORT_NAME while the server is shutting down".into());
                }
                if len as usize > MAX_STRING_LEN {
                    return self.abort(format!("NBD_OPT_EXPORT_NAME with a {len}-byte name"));
                }
                self.collect(code, len);
            }
            OPT_ABORT => {
                // Any data is ignored (the spec says SHOULD ignore, not reject); we stop reading.
                log::debug!("NBD client sent NBD_OPT_ABORT");
                self.out.with_tail(|v| encode_rep_ack(v, code));
                self.finished = true;
            }
            _ if self.shutting_down => {
                self.skip_then_reply(code, len, REP_ERR_SHUTDOWN, "server is shutting down")
            }
            OPT_STARTTLS => self.starttls(len),
            _ if tls_required => self.skip_then_reply(
                code,
                len,
                REP_ERR_TLS_REQD,
                "TLS is required: negotiate NBD_OPT_STARTTLS first",
            ),
            OPT_LIST => {
                if len != 0 {
                    return self.skip_then_reply(code, len, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                self.pending = Some(Pending::List);
                self.events.push_back(Event::ListExports);
            }
            OPT_INFO | OPT_GO => {
                if len > MAX_INFO_DATA {
                    return self.skip_then_reply(
                        code,
                        len,
                        REP_ERR_INVALID,
                        "option data too long to be valid",
                    );
                }
                self.collect(code, len);
            }
            OPT_STRUCTURED_REPLY => {
                if !self.cfg.structured_replies {
                    self.skip_then_reply(code, len, REP_ERR_UNSUP, "structured replies are disabled")
                } else if len != 0 {
                    self.skip_then_reply(code, len, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                } else if self.extended {
                    self.opt_reply(code, REP_ERR_EXT_HEADER_REQD, "extended headers are already in use")
                } else {
                    self.structured = true;
                    self.opt_reply(code, REP_ACK, "");
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !self.cfg.meta_contexts {
                    return self.skip_then_reply(code, len, REP_ERR_UNSUP, "metadata contexts are disabled");
                }
                if code == OPT_SET_META_CONTEXT {
                    // A SET replaces the previous selection entirely, even when it fails.
                    self.meta_export = None;
                    if !self.structured_replies() {
                        return self.skip_then_reply(
                            code,
                            len,
                            REP_ERR_INVALID,
                            "negotiate structured replies or extended headers first",
                        );
                    }
                }
                if len > MAX_META_DATA {
                    return self.skip_then_reply(code, len, REP_ERR_TOO_BIG, "too many or too long queries");
                }
                self.collect(code, len);
            }
            OPT_EXTENDED_HEADERS => {
                // Extended headers imply structured replies, so `--no-sr` refuses them too.
                if !(self.cfg.extended_headers && self.cfg.structured_replies) {
                    self.skip_then_reply(code, len, REP_ERR_UNSUP, "extended headers are disabled")
                } else if len != 0 {
                    self.skip_then_reply(code, len, REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
                } else {
                    self.extended = true;
                    self.opt_reply(code, REP_ACK, "");
                }
            }
            _ => self.skip_then_reply(code, len, REP_ERR_UNSUP, &format!("option {code} is not supported")),
        }
    }

    /// NBD_OPT_STARTTLS (§F items 72 and 75).
    fn starttls(&mut self, len: u32) {
        let code = OPT_STARTTLS;
        if len != 0 {
            return self.skip_then_reply(code, len, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        }
        if self.cfg.tls == TlsPolicy::Off || !self.fixed_newstyle {
            return self.opt_reply(code, REP_ERR_POLICY, "TLS is not available on this server");
        }
        if self.tls == TlsState::Active {
            return self.opt_reply(code, REP_ERR_INVALID, "TLS is already active");
        }
        let cost = self.cfg.tls_session_budget;
        if !self.budget.try_reserve(cost) {
            return self.opt_reply(
                code,
                REP_ERR_POLICY,
                "the server has no memory left for another TLS session (--memory-limit); try later",
            );
        }
        self.tls_reserved = cost;
        // Whatever is buffered behind the request was sent before the client could have seen
        // our ACK, so it is not the TLS handshake: a man in the middle injecting plaintext
        // (§F item 77, the STARTTLS buffering bug class). It is never acted on; the connection
        // is dropped.
        if !self.inbuf.is_empty() {
            let n = self.inbuf.pending().len();
            return self.abort(format!("{n} plaintext bytes pipelined after NBD_OPT_STARTTLS"));
        }
        self.opt_reply(code, REP_ACK, "");
        self.tls = TlsState::Starting;
        self.events.push_back(Event::StartTls);
    }

    /// Buffer `len` bytes of option data (already checked against the option's own limit), then
    /// hand them to `option_data`.
    fn collect(&mut self, code: u32, len: u32) {
        let need = len as usize;
        if need == 0 {
            return self.option_data(code, Vec::new());
        }
        // Grows as bytes arrive: a client that declares more than it sends costs nothing.
        self.instate = InState::OptData { code, need, data: Vec::new() };
    }

    /// Discard `len` bytes of option data, then send one reply.
    fn skip_then_reply(&mut self, code: u32, len: u32, reply: u32, msg: &str) {
        if len == 0 {
            return self.opt_reply(code, reply, msg);
        }
        self.instate = InState::Skip {
            remaining: u64::from(len),
            then: AfterSkip::OptReply { code, reply, msg: msg.to_owned() },
        };
    }

    /// A final option reply: ACK, or an error with a message.
    pub(super) fn opt_reply(&mut self, code: u32, reply: u32, msg: &str) {
        if reply == REP_ACK {
            self.out.with_tail(|v| encode_rep_ack(v, code));
        } else {
            log::debug!("NBD option {code} refused ({reply:#x}): {msg}");
            self.out.with_tail(|v| encode_rep_error(v, code, reply, msg));
        }
    }

    /// The data of a known option has arrived in full.
    pub(super) fn option_data(&mut self, code: u32, data: Vec<u8>) {
        match code {
            OPT_EXPORT_NAME => match parse_string(&data, "export name") {
                Ok(name) => {
                    self.pending = Some(Pending::ExportName { name: name.clone() });
                    self.events.push_back(Event::OpenExport { name, probe: false });
                }
                Err(e) => self.abort(format!("NBD_OPT_EXPORT_NAME: {}", e.message())),
            },
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Ok(req) => {
                    let name = req.name.clone();
                    self.pending = Some(Pending::Info { code, req });
                    self.events.push_back(Event::OpenExport { name, probe: code == OPT_INFO });
                }
                Err(e) => self.opt_reply(code, e.reply_type(), e.message()),
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                match parse_meta_context_request(&data, limits::MAX_META_QUERIES) {
                    Ok(req) => self.meta_context(code, req),
                    Err(e) => self.opt_reply(code, e.reply_type(), e.message()),
                }
            }
            _ => debug_assert!(false, "option {code} has no data handler"),
        }
    }

    /// LIST or SET: we know one context, `base:allocation`.
    fn meta_context(&mut self, code: u32, req: MetaContextRequest) {
        let set = code == OPT_SET_META_CONTEXT;
        let matched = if req.queries.is_empty() {
            // No queries: LIST lists everything; SET selects nothing.
            !set
        } else {
            // Unknown namespaces and leaves are ignored; `base:` is a LIST-only wildcard.
            req.queries.iter().any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
        };
        if matched {
            // Ids are ours to choose; LIST replies SHOULD use 0.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            self.out.with_tail(|v| encode_rep_meta_context(v, code, id, BASE_ALLOCATION));
            if set {
                self.meta_export = Some(req.name);
            }
        }
        self.opt_reply(code, REP_ACK, "");
    }

    /// The driver's answer to `OpenExport`.
    pub(super) fn on_export(&mut self, r: Result<ExportInfo, NbdError>) {
        let pending = match self.pending.take() {
            Some(Pending::List) => {
                self.pending = Some(Pending::List);
                log::debug!("NBD: export open result while a list is pending ignored");
                return;
            }
            None => {
                log::debug!("NBD: unexpected export open result ignored");
                return;
            }
            Some(p) => p,
        };
        match (pending, r) {
            (Pending::Oldstyle, Ok(info)) => {
                let ex = self.make_export(String::new(), &info);
                self.out
                    .with_tail(|v| encode_oldstyle_greeting(v, ex.size, u32::from(ex.transmission_flags)));
                self.enter_transmission(ex);
            }
            (Pending::ExportName { name }, Ok(info)) => {
                let ex = self.make_export(name, &info);
                let zeroes = !self.no_zeroes;
                self.out.with_tail(|v| encode_export_name_reply(v, ex.size, ex.transmission_flags, zeroes));
                self.enter_transmission(ex);
            }
            (Pending::Oldstyle | Pending::ExportName { .. }, Err(e)) => {
                self.abort(format!("cannot open the export: {e}"));
            }
            (Pending::Info { code, req }, Ok(info)) => {
                let ex = self.make_export(req.name, &info);
                self.info_replies(code, &req.infos, &ex);
                if code == OPT_GO {
                    self.enter_transmission(ex);
                }
            }
            (Pending::Info { code, req }, Err(e)) => {
                let msg = match e.message {
                    Some(m) => m,
                    None => format!("cannot open export {:?}: {}", req.name, e.errno.name()),
                };
                // The reply type tells the client why: refused by policy (a filter such as
                // `ip` or `limit`), the server shutting down, or no such export.
                let reply = match e.errno {
                    Errno::Perm => REP_ERR_POLICY,
                    Errno::Shutdown => REP_ERR_SHUTDOWN,
                    _ => REP_ERR_UNKNOWN,
                };
                self.opt_reply(code, reply, &msg);
            }
            (Pending::List, _) => {}
        }
    }

    /// INFO/GO success: NBD_INFO_EXPORT always, the requested extras, then ACK. A function of
    /// the export and the negotiated state only, so an INFO and the GO after it agree.
    fn info_replies(&mut self, code: u32, infos: &[u16], ex: &Export) {
        self.out.with_tail(|v| {
            encode_info_export(v, code, ex.size, ex.transmission_flags);
            if infos.contains(&INFO_NAME) {
                encode_info_string(v, code, INFO_NAME, &ex.name);
            }
            if infos.contains(&INFO_DESCRIPTION) {
                if let Some(d) = &ex.description {
                    encode_info_string(v, code, INFO_DESCRIPTION, d);
                }
            }
            // Sent unasked too when the export needs more than byte alignment or takes less
            // than the default payload: the spec makes advertising constraints stricter than
            // the defaults mandatory.
            let stricter = ex.min_block > 1 || ex.max_payload < DEFAULT_MAX_PAYLOAD;
            if infos.contains(&INFO_BLOCK_SIZE) || stricter {
                encode_info_block_size(v, code, ex.min_block, ex.preferred_block, ex.max_payload);
            }
            encode_rep_ack(v, code);
        });
    }

    /// The driver's answer to `ListExports`.
    pub(super) fn on_export_list(&mut self, list: Vec<ExportDesc>) {
        match self.pending.take() {
            Some(Pending::List) => {}
            other => {
                self.pending = other;
                log::debug!("NBD: unexpected export list ignored");
                return;
            }
        }
        self.out.with_tail(|v| {
            for e in &list {
                // A name no client could send back in GO is not worth listing.
                if e.name.len() > MAX_STRING_LEN {
                    log::warn!("export name of {} bytes left out of NBD_OPT_LIST", e.name.len());
                    continue;
                }
                encode_rep_server(v, OPT_LIST, &e.name, e.description.as_deref());
            }
            encode_rep_ack(v, OPT_LIST);
        });
    }

    /// What the client is told about `info`, given what has been negotiated so far.
    fn make_export(&self, name: String, info: &ExportInfo) -> Export {
        let (min_block, preferred_block, max_payload) =
            block_sizes(self.cfg.max_request, self.budget.limit(), info.block_size.as_ref());
        let meta = self.structured_replies() && self.meta_export.as_deref() == Some(name.as_str());
        Export {
            size: info.size,
            description: info.description.clone(),
            transmission_flags: transmission_flags(info, self.structured_replies()),
            min_block,
            preferred_block,
            max_payload,
            meta,
            name,
        }
    }

    fn enter_transmission(&mut self, ex: Export) {
        log::debug!(
            "NBD client entering transmission: export {:?}, size {}, flags {:#x}, {}",
            ex.name,
            ex.size,
            ex.transmission_flags,
            if self.extended {
                "extended headers"
            } else if self.structured {
                "structured replies"
            } else {
                "simple replies"
            }
        );
        self.phase = Phase::Transmission;
        self.deadline = None;
        self.export = Some(ex);
        if self.shutting_down {
            self.closing = true;
        }
    }
}

/// Context id for `base:allocation` in SET replies and BLOCK_STATUS chunks.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// Transmission flags for an export (§H of the checklist).
pub(super) fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS;
    if !info.can_write {
        f |= FLAG_READ_ONLY;
    }
    if info.can_flush {
        f |= FLAG_SEND_FLUSH;
    }
    if info.fua != Support::None {
        f |= FLAG_SEND_FUA;
    }
    if info.is_rotational {
        f |= FLAG_ROTATIONAL;
    }
    if info.can_trim {
        f |= FLAG_SEND_TRIM;
    }
    if info.zero != Support::None {
        f |= FLAG_SEND_WRITE_ZEROES;
        // FAST_ZERO must be clear without WRITE_ZEROES.
        if info.can_fast_zero {
            f |= FLAG_SEND_FAST_ZERO;
        }
    }
    // DF must be clear unless structured replies (or extended headers) were negotiated.
    if structured {
        f |= FLAG_SEND_DF;
    }
    if info.can_multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if info.cache != Support::None {
        f |= FLAG_SEND_CACHE;
    }
    f
}

/// (minimum, preferred, maximum payload) satisfying the spec's rules whatever a layer reports:
/// minimum a power of two ≤ 64 KiB; preferred a power of two ≥ max(minimum, 512); maximum ≥
/// preferred and a multiple of the minimum. The maximum is also bounded by `--max-request` and
/// the memory budget (a request larger than the budget could never be reserved).
pub(super) fn block_sizes(
    max_request: u32,
    budget_limit: usize,
    bs: Option<&crate::layer::BlockSize>,
) -> (u32, u32, u32) {
    let min = bs.map_or(1, |b| b.minimum).clamp(1, MAX_MIN_BLOCK);
    // ≤ 64 KiB, so the next power of two is too.
    let min = min.next_power_of_two();
    let floor = min.max(512);
    let layer_max = bs.map_or(u32::MAX, |b| if b.maximum == 0 { u32::MAX } else { b.maximum });
    let budget_max = u32::try_from(budget_limit).unwrap_or(u32::MAX);
    let mut max = max_request.min(layer_max).min(budget_max).min(PAYLOAD_CEILING);
    max -= max % min;
    // Preferred and maximum cannot go below max(min, 512); that floor wins over the caps above.
    max = max.max(floor);
    let pref = bs.map_or(limits::PREFERRED_BLOCK_SIZE, |b| b.preferred).max(floor);
    let mut pref = pref.checked_next_power_of_two().unwrap_or(PAYLOAD_CEILING);
    if pref > max {
        // The largest power of two ≤ max; still ≥ floor because max ≥ floor and floor is one.
        pref = 1 << (31 - max.leading_zeros());
    }
    (min, pref, max)
}
