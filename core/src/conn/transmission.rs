//! The transmission phase: request headers are checked against the protocol and turned into
//! layer requests; results are turned into simple, structured or extended replies.

use std::ops::Range;
use std::sync::Arc;

use smallvec::{smallvec, SmallVec};

use super::options::BASE_ALLOCATION_ID;
use super::{AfterSkip, Conn, Event, InState, Op, Outcome, Request, RequestId, Slot};
use crate::error::{Errno, NbdError};
use crate::layer::{Extents, Flags, Lent, LentPieces};
use crate::limits;
use crate::proto::*;

/// Holes are detected in whole, aligned blocks of this size.
const HOLE_BLOCK: usize = 4096;

/// Largest descriptor length in a 32-bit BLOCK_STATUS chunk that keeps 4 KiB alignment.
const MAX_DESC32: u64 = 0xFFFF_F000;

/// What to do with one request header.
enum Plan {
    Disc,
    /// The payload is too large to buffer: answer EINVAL and close once in-flight requests
    /// are answered (the payload is never read, so the stream cannot be resynchronised).
    Close(NbdError),
    /// Answer with an error after discarding `payload` bytes.
    Refuse {
        payload: u64,
        err: NbdError,
    },
    Read {
        len: usize,
        flags: Flags,
        df: bool,
    },
    Write {
        len: usize,
        flags: Flags,
    },
    Other {
        op: Op,
        count: u64,
        flags: Flags,
    },
}

/// The pieces of one READ reply. Two inline: a read with no holes (the common case) is one
/// piece, so splitting it allocates nothing.
pub(super) type Pieces = SmallVec<[Piece; 2]>;

/// A piece of a structured READ reply, as a range of the read buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Piece {
    Data(Range<usize>),
    Hole(Range<usize>),
}

impl Conn {
    /// Act on a request header of `hlen` bytes still at the front of the input buffer. Returns
    /// false (header left buffered) when the request must wait for budget.
    pub(super) fn request_header(&mut self, h: RequestHeader, hlen: usize) -> bool {
        let acted = self.act_on_header(h, hlen);
        if acted && h.typ != CMD_DISC {
            self.requests += 1;
        }
        acted
    }

    fn act_on_header(&mut self, h: RequestHeader, hlen: usize) -> bool {
        match self.plan(&h) {
            Plan::Disc => {
                self.inbuf.consume(hlen);
                log::debug!("NBD client sent NBD_CMD_DISC with {} requests in flight", self.slots.count);
                self.closing = true;
            }
            Plan::Close(err) => {
                self.inbuf.consume(hlen);
                log::warn!("NBD client request refused, closing: {err}");
                self.reply_error(h.cookie, h.offset, &err, 0);
                self.closing = true;
            }
            Plan::Refuse { payload, err } => {
                self.inbuf.consume(hlen);
                log::debug!("NBD request {} refused: {err}", h.typ);
                if payload > 0 {
                    let then = AfterSkip::ReqError { cookie: h.cookie, offset: h.offset, err };
                    self.instate = InState::Skip { remaining: payload, then };
                } else {
                    self.reply_error(h.cookie, h.offset, &err, 0);
                }
            }
            Plan::Read { len, flags, df } => {
                if !self.budget.reserve_in_turn(len, &mut self.budget_place) {
                    self.budget_blocked = true;
                    return false;
                }
                self.inbuf.consume(hlen);
                let slot = self.slot(&h, CMD_READ, len as u64, flags, df, len);
                let id = self.slots.insert(slot);
                let op = Op::Read { count: len };
                self.events.push_back(Event::Request(Request { id, op, offset: h.offset, flags }));
            }
            Plan::Write { len, flags } => {
                if !self.budget.reserve_in_turn(len, &mut self.budget_place) {
                    self.budget_blocked = true;
                    return false;
                }
                self.inbuf.consume(hlen);
                let slot = self.slot(&h, CMD_WRITE, len as u64, flags, false, len);
                let id = self.slots.insert(slot);
                if len == 0 {
                    self.write_payload_complete(id, Vec::new());
                } else {
                    // Filled from the header buffer first, then read into directly (read_buf).
                    self.instate = InState::Payload { id, data: crate::bufpool::take(len), filled: 0 };
                }
            }
            Plan::Other { op, count, flags } => {
                self.inbuf.consume(hlen);
                let slot = self.slot(&h, h.typ, count, flags, false, 0);
                let id = self.slots.insert(slot);
                self.events.push_back(Event::Request(Request { id, op, offset: h.offset, flags }));
            }
        }
        true
    }

    fn slot(&self, h: &RequestHeader, cmd: u16, count: u64, flags: Flags, df: bool, reserved: usize) -> Slot {
        Slot { cookie: h.cookie, cmd, offset: h.offset, count, flags, df, reserved }
    }

    /// An accepted WRITE's payload is complete: hand it to the layers.
    pub(super) fn write_payload_complete(&mut self, id: RequestId, data: Vec<u8>) {
        let Some(s) = self.slots.get(id) else { return };
        let (offset, flags) = (s.offset, s.flags);
        self.events.push_back(Event::Request(Request { id, op: Op::Write { data }, offset, flags }));
    }

    /// Largest payload accepted: the advertised maximum, and never more than the whole budget
    /// (such a reservation could never succeed).
    fn max_payload(&self) -> u64 {
        let adv = self.export.as_ref().map_or(0, |e| u64::from(e.max_payload));
        adv.min(self.budget.limit() as u64)
    }

    /// Check a header against the protocol and what was advertised (§J, §K).
    fn plan(&self, h: &RequestHeader) -> Plan {
        let (tflags, meta) = match &self.export {
            Some(e) => (e.transmission_flags, e.meta),
            None => (0, false),
        };
        let ext = self.extended;
        let f = h.flags;
        let has = |bit: u16| f & bit != 0;
        let payload_flag = ext && has(CMD_FLAG_PAYLOAD_LEN);
        // How many bytes follow the header. A WRITE always carries its data: the extension says
        // a client MUST set PAYLOAD_LEN on it, but qemu 10's client does not, and the data
        // follows all the same (qemu's own server accepts both). Any other command carries a
        // payload only with PAYLOAD_LEN under extended headers.
        let payload = if h.typ == CMD_WRITE || payload_flag { h.length } else { 0 };
        if h.typ == CMD_DISC {
            return Plan::Disc;
        }
        let max = self.max_payload();
        let refuse = |msg: String| Plan::Refuse { payload, err: NbdError::inval(msg) };
        if payload > max {
            let msg = format!("payload of {payload} bytes is larger than the maximum of {max}");
            // Up to the size a client may send unasked, the payload is read past and the
            // connection lives on (§M item 129: not a denial of service). Larger, or declared
            // with PAYLOAD_LEN beyond what was advertised, it is one.
            if payload <= u64::from(DEFAULT_MAX_PAYLOAD) && !payload_flag {
                return refuse(msg);
            }
            return Plan::Close(NbdError::inval(msg));
        }
        if self.shutting_down {
            // §E item 68: requests in flight finish; new ones get ESHUTDOWN (payload read past).
            return Plan::Refuse {
                payload,
                err: NbdError::msg(Errno::Shutdown, "the server is shutting down"),
            };
        }
        let known = CMD_FLAG_FUA
            | CMD_FLAG_NO_HOLE
            | CMD_FLAG_DF
            | CMD_FLAG_REQ_ONE
            | CMD_FLAG_FAST_ZERO
            | if ext { CMD_FLAG_PAYLOAD_LEN } else { 0 };
        if f & !known != 0 {
            return refuse(format!("unknown command flags {:#x}", f & !known));
        }
        if has(CMD_FLAG_FUA) && tflags & FLAG_SEND_FUA == 0 {
            return refuse("FUA was not advertised".into());
        }
        if has(CMD_FLAG_NO_HOLE) && h.typ != CMD_WRITE_ZEROES {
            return refuse("NO_HOLE is only valid on WRITE_ZEROES".into());
        }
        if has(CMD_FLAG_DF) && (h.typ != CMD_READ || tflags & FLAG_SEND_DF == 0) {
            return refuse("DF is only valid on READ after structured replies".into());
        }
        if has(CMD_FLAG_REQ_ONE) && h.typ != CMD_BLOCK_STATUS {
            return refuse("REQ_ONE is only valid on BLOCK_STATUS".into());
        }
        if has(CMD_FLAG_FAST_ZERO) && (h.typ != CMD_WRITE_ZEROES || tflags & FLAG_SEND_FAST_ZERO == 0) {
            return refuse("FAST_ZERO is only valid on WRITE_ZEROES when advertised".into());
        }
        if payload_flag && h.typ != CMD_WRITE {
            // BLOCK_STATUS_PAYLOAD is not offered, so only WRITE carries a payload.
            return refuse("PAYLOAD_LEN is only valid on WRITE".into());
        }
        let mut flags = if has(CMD_FLAG_FUA) { Flags::FUA } else { Flags::NONE };
        let count = h.length;
        let op = match h.typ {
            CMD_READ => {
                if count > max {
                    return refuse(format!("read of {count} bytes is larger than the maximum of {max}"));
                }
                // ≤ max, which is at most 2 GiB.
                return Plan::Read { len: count as usize, flags, df: has(CMD_FLAG_DF) };
            }
            // ≤ max, checked above.
            CMD_WRITE => return Plan::Write { len: payload as usize, flags },
            CMD_FLUSH => Op::Flush,
            CMD_TRIM => Op::Trim { count },
            CMD_CACHE => Op::Cache { count },
            CMD_WRITE_ZEROES => {
                if !has(CMD_FLAG_NO_HOLE) {
                    flags = flags | Flags::MAY_TRIM;
                }
                if has(CMD_FLAG_FAST_ZERO) {
                    flags = flags | Flags::FAST_ZERO;
                }
                Op::Zero { count }
            }
            CMD_BLOCK_STATUS => {
                if !meta {
                    return refuse("no metadata context was selected for this export".into());
                }
                if has(CMD_FLAG_REQ_ONE) {
                    flags = flags | Flags::REQ_ONE;
                }
                Op::BlockStatus { count }
            }
            t => return refuse(format!("unknown command {t}")),
        };
        Plan::Other { op, count, flags }
    }

    /// A request's result from the driver.
    pub(super) fn on_result(&mut self, id: RequestId, r: Result<Outcome, NbdError>) {
        let Some(slot) = self.slots.remove(id) else {
            log::debug!("NBD: result for unknown request {id:?} ignored");
            return;
        };
        if self.is_dead() {
            // EOF or abort: nobody is listening any more.
            self.budget.release(slot.reserved);
            return;
        }
        let (cookie, offset) = (slot.cookie, slot.offset);
        match (slot.cmd, r) {
            (_, Err(e)) => self.reply_error(cookie, offset, &for_the_wire(&slot, e), slot.reserved),
            (CMD_READ, Ok(Outcome::Data(buf))) if buf.len() as u64 == slot.count => {
                self.reply_read(&slot, buf)
            }
            (CMD_READ, Ok(Outcome::Lent(pieces)))
                if pieces.iter().map(Lent::len).sum::<usize>() as u64 == slot.count =>
            {
                self.reply_read_lent(&slot, pieces)
            }
            (CMD_BLOCK_STATUS, Ok(Outcome::Extents(e))) => self.reply_block_status(&slot, e),
            (CMD_READ | CMD_BLOCK_STATUS, Ok(other)) => {
                log::error!("NBD: layer returned {other:?} for command {}", slot.cmd);
                let err = NbdError::io("internal error: unexpected result from the layer");
                self.reply_error(cookie, offset, &err, slot.reserved)
            }
            (_, Ok(_)) => self.reply_ok(cookie, offset, slot.reserved),
        }
    }

    /// Structured/extended chunk form, or None for simple replies.
    fn form(&self) -> Option<ReplyForm> {
        if self.extended {
            Some(ReplyForm::Extended)
        } else if self.structured {
            Some(ReplyForm::Structured)
        } else {
            None
        }
    }

    /// An error reply: a simple reply, or an ERROR chunk carrying the message.
    pub(super) fn reply_error(&mut self, cookie: u64, offset: u64, err: &NbdError, release: usize) {
        let errno = err.errno.wire();
        let form = self.form();
        self.out.with_tail(|v| match form {
            None => encode_simple_reply(v, errno, cookie),
            Some(f) => {
                let msg = err.message.as_deref().unwrap_or("");
                encode_error_chunk(v, f, REPLY_FLAG_DONE, cookie, offset, errno, msg)
            }
        });
        self.out.mark_release(release, &self.budget);
    }

    /// Success without data: a simple reply (allowed under structured replies), or a NONE
    /// chunk with extended headers, where simple replies are forbidden.
    fn reply_ok(&mut self, cookie: u64, offset: u64, release: usize) {
        let form = self.form();
        self.out.with_tail(|v| match form {
            Some(ReplyForm::Extended) => encode_none_chunk(v, ReplyForm::Extended, cookie, offset),
            _ => encode_simple_reply(v, 0, cookie),
        });
        self.out.mark_release(release, &self.budget);
    }

    /// A successful READ. The data buffer is queued as is (or shared between chunks), never
    /// copied.
    fn reply_read(&mut self, slot: &Slot, data: Vec<u8>) {
        let (cookie, offset) = (slot.cookie, slot.offset);
        let Some(form) = self.form() else {
            self.out.with_tail(|v| encode_simple_reply(v, 0, cookie));
            self.out.push_vec(data);
            self.out.mark_release(slot.reserved, &self.budget);
            return;
        };
        if data.is_empty() {
            self.out.with_tail(|v| encode_none_chunk(v, form, cookie, offset));
            self.out.mark_release(slot.reserved, &self.budget);
            return;
        }
        let pieces = if slot.df { smallvec![Piece::Data(0..data.len())] } else { split_holes(&data, offset) };
        let last = pieces.len() - 1;
        if let [Piece::Data(_)] = pieces.as_slice() {
            // One data chunk: no need to share the buffer.
            let n = data.len();
            self.out.with_tail(|v| {
                encode_offset_data_header(v, form, REPLY_FLAG_DONE, cookie, offset, offset, n)
            });
            self.out.push_vec(data);
        } else {
            let shared = Arc::new(data);
            for (i, p) in pieces.iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                match p {
                    Piece::Data(r) => {
                        // In range: the layer accepted offset + length.
                        let at = offset.saturating_add(r.start as u64);
                        let n = r.len();
                        self.out
                            .with_tail(|v| encode_offset_data_header(v, form, flags, cookie, offset, at, n));
                        self.out.push_shared(&shared, r.start, r.end);
                    }
                    Piece::Hole(r) => {
                        let at = offset.saturating_add(r.start as u64);
                        // split_holes keeps holes below 2^31 bytes.
                        let n = u32::try_from(r.len()).unwrap_or(u32::MAX);
                        self.out.with_tail(|v| encode_offset_hole(v, form, flags, cookie, offset, at, n));
                    }
                }
            }
        }
        self.out.mark_release(slot.reserved, &self.budget);
    }

    /// A successful READ from lent pieces: queued as they are, never copied. Unallocated
    /// pieces become OFFSET_HOLE chunks under structured replies (unless the client asked for
    /// DF), and zero bytes from a shared zero page otherwise.
    fn reply_read_lent(&mut self, slot: &Slot, pieces: LentPieces) {
        let (cookie, offset) = (slot.cookie, slot.offset);
        let total = slot.count as usize;
        let Some(form) = self.form() else {
            self.out.with_tail(|v| encode_simple_reply(v, 0, cookie));
            for p in pieces {
                self.out.push_lent(p);
            }
            self.out.mark_release(slot.reserved, &self.budget);
            return;
        };
        if total == 0 {
            self.out.with_tail(|v| encode_none_chunk(v, form, cookie, offset));
            self.out.mark_release(slot.reserved, &self.budget);
            return;
        }
        // Runs of data pieces become one data chunk each; runs of holes one hole chunk each. A
        // run is measured on the pieces still to go (its header comes first), then taken.
        let is_hole = |p: &Lent| !slot.df && matches!(p, Lent::Zero(_));
        let mut rest = pieces.into_iter();
        let mut at = 0usize;
        while let Some(hole) = rest.as_slice().iter().find(|p| !p.is_empty()).map(is_hole) {
            let (count, n) = rest
                .as_slice()
                .iter()
                .take_while(|p| p.is_empty() || is_hole(p) == hole)
                .fold((0, 0), |(count, n), p| (count + 1, n + p.len()));
            let flags = if at + n == total { REPLY_FLAG_DONE } else { 0 };
            let chunk_at = offset.saturating_add(at as u64);
            let run = rest.by_ref().take(count);
            if hole {
                // A read is at most --max-request bytes, far below 2^32.
                let len = u32::try_from(n).unwrap_or(u32::MAX);
                self.out.with_tail(|v| encode_offset_hole(v, form, flags, cookie, offset, chunk_at, len));
                run.for_each(drop);
            } else {
                self.out
                    .with_tail(|v| encode_offset_data_header(v, form, flags, cookie, offset, chunk_at, n));
                for p in run.filter(|p| !p.is_empty()) {
                    self.out.push_lent(p);
                }
            }
            at += n;
        }
        self.out.mark_release(slot.reserved, &self.budget);
    }

    /// One BLOCK_STATUS (or BLOCK_STATUS_EXT) chunk for `base:allocation`.
    fn reply_block_status(&mut self, slot: &Slot, extents: Extents) {
        let (cookie, offset) = (slot.cookie, slot.offset);
        let req_one = slot.flags.contains(Flags::REQ_ONE);
        let max_payload = self.export.as_ref().map_or(0, |e| e.max_payload) as usize;
        let form = self.form();
        let descs = match form {
            Some(ReplyForm::Structured) => {
                // A chunk must not exceed the max payload; nor the spec's 2^20 descriptors.
                let cap = (max_payload.saturating_sub(4) / 8).clamp(1, limits::MAX_EXTENTS_PER_REPLY);
                descriptors(&extents, slot.count, req_one, MAX_DESC32, cap)
            }
            Some(ReplyForm::Extended) => {
                let cap = (max_payload.saturating_sub(8) / 16).clamp(1, limits::MAX_EXTENTS_PER_REPLY);
                descriptors(&extents, slot.count, req_one, u64::MAX, cap)
            }
            None => Vec::new(),
        };
        if descs.is_empty() {
            log::error!("NBD: no block status to send ({} extents from the layer)", extents.0.len());
            let err = NbdError::msg(Errno::Io, "internal error: no block status");
            return self.reply_error(cookie, offset, &err, slot.reserved);
        }
        self.out.with_tail(|v| match form {
            Some(ReplyForm::Extended) => {
                let d: Vec<(u64, u64)> = descs.iter().map(|&(l, s)| (l, u64::from(s))).collect();
                encode_block_status_ext(v, REPLY_FLAG_DONE, cookie, offset, BASE_ALLOCATION_ID, &d)
            }
            _ => {
                // Every length is ≤ MAX_DESC32 here.
                let d: Vec<(u32, u32)> = descs.iter().map(|&(l, s)| (l as u32, s)).collect();
                encode_block_status(v, REPLY_FLAG_DONE, cookie, BASE_ALLOCATION_ID, &d)
            }
        });
        self.out.mark_release(slot.reserved, &self.budget);
    }
}

/// A layer's error as the client may see it (§M item 133, and what nbdkit sends): ENOTSUP
/// only for a FAST_ZERO write-zeroes and EOVERFLOW only for a DF read; anywhere else either
/// means the request was not acceptable, EINVAL. The message stays.
fn for_the_wire(slot: &Slot, e: NbdError) -> NbdError {
    let fits = match e.errno {
        Errno::NotSup => slot.cmd == CMD_WRITE_ZEROES && slot.flags.contains(Flags::FAST_ZERO),
        Errno::Overflow => slot.cmd == CMD_READ && slot.df,
        _ => true,
    };
    if fits {
        e
    } else {
        NbdError { errno: Errno::Inval, message: e.message }
    }
}

/// Block-status descriptors for a request of `count` bytes: extents longer than `max_len` are
/// split, no descriptor starts at or past `count` (so the first N−1 sum to less than the
/// request), at most `cap` of them, and with REQ_ONE exactly one no longer than `count`.
pub(super) fn descriptors(
    e: &Extents,
    count: u64,
    req_one: bool,
    max_len: u64,
    cap: usize,
) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut covered = 0u64;
    'extents: for x in &e.0 {
        let mut left = x.length;
        while left > 0 {
            if covered >= count || out.len() >= cap {
                break 'extents;
            }
            let mut l = left.min(max_len);
            if req_one {
                l = l.min(count);
            }
            out.push((l, x.flags));
            covered = covered.saturating_add(l);
            left -= l;
            if req_one {
                break 'extents;
            }
        }
    }
    out
}

/// Split a READ buffer into data and hole pieces: every run of all-zero 4 KiB blocks aligned
/// to 4 KiB in the export (`offset` is where `data` starts) becomes a hole. Holes stay below
/// 2^31 bytes so their 32-bit length field always fits.
pub(super) fn split_holes(data: &[u8], offset: u64) -> Pieces {
    const MAX_HOLE: usize = 1 << 31;
    let len = data.len();
    let rem = (offset % HOLE_BLOCK as u64) as usize;
    let mut pos = if rem == 0 { 0 } else { HOLE_BLOCK - rem };
    let mut data_start = 0;
    let mut pieces = Pieces::new();
    while pos.saturating_add(HOLE_BLOCK) <= len {
        if !is_zero(&data[pos..pos + HOLE_BLOCK]) {
            pos += HOLE_BLOCK;
            continue;
        }
        let hole_start = pos;
        while pos + HOLE_BLOCK <= len && pos - hole_start < MAX_HOLE && is_zero(&data[pos..pos + HOLE_BLOCK])
        {
            pos += HOLE_BLOCK;
        }
        if hole_start > data_start {
            pieces.push(Piece::Data(data_start..hole_start));
        }
        pieces.push(Piece::Hole(hole_start..pos));
        data_start = pos;
    }
    if data_start < len {
        pieces.push(Piece::Data(data_start..len));
    }
    pieces
}

fn is_zero(b: &[u8]) -> bool {
    // Most data blocks fail on the first bytes; the OR-fold over the rest vectorises well.
    b.iter().take(16).all(|&x| x == 0) && b.iter().fold(0u8, |a, &x| a | x) == 0
}
