//! The log filter (nbdkit-log-filter): write one line per connection event and two per request
//! (when it is issued and when it completes) to a file, in nbdkit's log file format:
//!
//! ```text
//! 2020-08-06 02:07:23.080712 connection=1 Connect export="" tls=0 size=0x400 minsize=0x0 ...
//! 2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...
//! 2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0
//! 2020-08-06 02:07:23.081255 connection=1 Disconnect transactions=1
//! ```
//!
//! Timestamps are UTC with microseconds. Connections are numbered from 1 in the order they reach
//! this filter, requests from 1 within each connection. Failures read `return=-1 error=EIO`.

use std::cell::Cell;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ParamSpec, Support, EXTENT_HOLE, EXTENT_ZERO,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "log",
    summary: "log every connection and request to a file (nbdkit's log format)",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "logfile", help: "(required) The file to write the log to." },
    ParamSpec {
        name: "logappend",
        help: "true: append to an existing log file; false (default): truncate it.",
    },
];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    if p.take("logscript").is_some() {
        return Err(ConfigError::new("log: logscript= is not supported; use logfile="));
    }
    let path =
        p.take("logfile").ok_or_else(|| ConfigError::new("log: missing required parameter logfile="))?;
    let append =
        p.take_bool("logappend").map_err(|e| ConfigError::new(format!("log: {}", e.0)))?.unwrap_or(false);
    // Opened here, once, so a bad path is reported at start-up rather than at the first client.
    let mut opts = OpenOptions::new();
    opts.create(true);
    if append {
        opts.append(true);
    } else {
        opts.write(true).truncate(true);
    }
    let file =
        opts.open(&path).map_err(|e| ConfigError::new(format!("log: cannot open logfile '{path}': {e}")))?;
    Ok(Arc::new(LogFactory {
        out: Arc::new(LogFile { file: Mutex::new(file), path, warned: AtomicBool::new(false) }),
        connections: AtomicU64::new(0),
    }))
}

/// The log file, shared by every connection on every event loop.
struct LogFile {
    file: Mutex<File>,
    path: String,
    /// A write error is reported once, not once per request.
    warned: AtomicBool,
}

impl LogFile {
    /// Append one line. This is a blocking write on the event loop, accepted on purpose: it is
    /// one short line to a local file, which the page cache absorbs (nbdkit also writes its log
    /// synchronously, in the request path). The mutex keeps lines from different loops whole.
    /// Logging is best effort: a failed write never fails the request.
    fn write_line(&self, line: &str) {
        let mut f = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                ::log::warn!("log filter: cannot write to {}: {e}", self.path);
            }
        }
    }
}

struct LogFactory {
    out: Arc<LogFile>,
    connections: AtomicU64,
}

impl FilterFactory for LogFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let conn = Rc::new(ConnLog {
            out: self.out.clone(),
            connection: self.connections.fetch_add(1, Ordering::Relaxed) + 1,
            last_id: Cell::new(0),
            disconnected: Cell::new(false),
        });
        conn.print("Connect", &connect_details(cx, &next.info()));
        Ok(Rc::new(FilterLayer { filter: LogFilter { conn }, next }))
    }
}

/// The `Connect` line's fields: what the layer below offers this connection.
fn connect_details(cx: &OpenCx, below: &ExportInfo) -> String {
    // Like nbdkit, show what this connection may do: on a read-only connection the write-like
    // capabilities are off even though the layer below could do them.
    let w = below.can_write && !cx.readonly;
    let level = |s: Support| match s {
        Support::None => 0,
        Support::Emulate => 1,
        Support::Native => 2,
    };
    let (min, pref, max) = below.block_size.map_or((0, 0, 0), |b| (b.minimum, b.preferred, b.maximum));
    format!(
        "export={} tls={} size={:#x} minsize={min:#x} prefsize={pref:#x} maxsize={max:#x} write={} flush={} \
         rotational={} trim={} zero={} fua={} extents={} cache={} fast_zero={}",
        shell_quote(&cx.export_name),
        u8::from(cx.is_tls),
        below.size,
        u8::from(w),
        u8::from(below.can_flush),
        u8::from(below.is_rotational),
        u8::from(w && below.can_trim),
        if w { level(below.zero) } else { 0 },
        if w { level(below.fua) } else { 0 },
        u8::from(below.can_extents),
        level(below.cache),
        u8::from(w && below.can_fast_zero),
    )
}

/// One connection's view of the log.
struct ConnLog {
    out: Arc<LogFile>,
    connection: u64,
    last_id: Cell<u64>,
    disconnected: Cell<bool>,
}

impl ConnLog {
    fn next_id(&self) -> u64 {
        let id = self.last_id.get() + 1;
        self.last_id.set(id);
        id
    }

    fn line(&self, body: std::fmt::Arguments<'_>) {
        let mut s = String::with_capacity(128);
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{} connection={} {body}", timestamp(SystemTime::now()), self.connection);
        self.out.write_line(&s);
    }

    fn print(&self, act: &str, details: &str) {
        self.line(format_args!("{act} {details}"));
    }

    fn enter(&self, id: u64, act: &str, details: &str) {
        if details.is_empty() {
            self.line(format_args!("{act} id={id} ..."));
        } else {
            self.line(format_args!("{act} id={id} {details} ..."));
        }
    }

    fn leave(&self, id: u64, act: &str, details: &str) {
        self.line(format_args!("...{act} id={id} {details}"));
    }

    fn leave_simple<T>(&self, id: u64, act: &str, r: &Result<T, NbdError>) {
        match r {
            Ok(_) => self.leave(id, act, "return=0"),
            Err(e) => self.leave(id, act, &format!("return=-1 error={}", e.errno.name())),
        }
    }

    fn disconnect(&self) {
        if !self.disconnected.replace(true) {
            self.print("Disconnect", &format!("transactions={}", self.last_id.get()));
        }
    }
}

impl Drop for ConnLog {
    /// A connection whose stack never got as far as `close` (a filter above failed to open, say)
    /// still gets its Disconnect line, so every Connect is paired.
    fn drop(&mut self) {
        self.disconnect()
    }
}

struct LogFilter {
    conn: Rc<ConnLog>,
}

impl LogFilter {
    /// Log the request line now and wrap `done` to log the result line when it completes.
    fn logged<T: 'static>(&self, act: &'static str, details: &str, done: Done<T>) -> Done<T> {
        let id = self.conn.next_id();
        self.conn.enter(id, act, details);
        let conn = self.conn.clone();
        Done::new(move |r: Result<T, NbdError>| {
            conn.leave_simple(id, act, &r);
            done.call(r)
        })
    }
}

fn bit(flags: Flags, f: Flags) -> u8 {
    u8::from(flags.contains(f))
}

impl Filter for LogFilter {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let details = format!("offset={offset:#x} count={:#x}", buf.len());
        next.pread(buf, offset, flags, self.logged("Read", &details, done))
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let details = format!("offset={offset:#x} count={:#x} fua={}", data.len(), bit(flags, Flags::FUA));
        next.pwrite(data, offset, flags, self.logged("Write", &details, done))
    }

    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        next.flush(flags, self.logged("Flush", "", done))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let details = format!("offset={offset:#x} count={count:#x} fua={}", bit(flags, Flags::FUA));
        next.trim(count, offset, flags, self.logged("Trim", &details, done))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let details = format!(
            "offset={offset:#x} count={count:#x} trim={} fua={} fast={}",
            bit(flags, Flags::MAY_TRIM),
            bit(flags, Flags::FUA),
            bit(flags, Flags::FAST_ZERO)
        );
        next.zero(count, offset, flags, self.logged("Zero", &details, done))
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let id = self.conn.next_id();
        let details = format!("offset={offset:#x} count={count:#x} req_one={}", bit(flags, Flags::REQ_ONE));
        self.conn.enter(id, "Extents", &details);
        let conn = self.conn.clone();
        let done = Done::new(move |r: Result<Extents, NbdError>| {
            match &r {
                Ok(e) => conn.leave(id, "Extents", &format!("extents=({}) return=0", extent_list(offset, e))),
                Err(_) => conn.leave_simple(id, "Extents", &r),
            }
            done.call(r)
        });
        next.extents(count, offset, flags, done)
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let details = format!("offset={offset:#x} count={count:#x}");
        next.cache(count, offset, flags, self.logged("Cache", &details, done))
    }

    fn close(&self, next: &Next) {
        self.conn.disconnect();
        next.close()
    }
}

/// `0x0 0x8000 "" 0x8000 0x8000 "hole,zero"`: absolute offset, length and type of each extent.
fn extent_list(mut offset: u64, e: &Extents) -> String {
    let mut s = String::new();
    for (i, x) in e.0.iter().enumerate() {
        let kind = match (x.flags & EXTENT_HOLE != 0, x.flags & EXTENT_ZERO != 0) {
            (true, true) => "hole,zero",
            (true, false) => "hole",
            (false, true) => "zero",
            (false, false) => "",
        };
        let sep = if i > 0 { " " } else { "" };
        let _ = write!(s, "{sep}{offset:#x} {:#x} \"{kind}\"", x.length);
        offset = offset.saturating_add(x.length);
    }
    s
}

/// Quote a string for the log as nbdkit does (shell style): as-is if it is non-empty and made of
/// safe characters only, otherwise in double quotes with `$`, `` ` ``, `\` and `"` escaped.
/// Unlike nbdkit, control characters are written as `\xHH`: the export name comes from the
/// client, and a raw newline in it would let a client forge log lines.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || ".-_=,:/".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        return s.to_owned();
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '$' | '`' | '\\' | '"' => {
                q.push('\\');
                q.push(c);
            }
            c if c.is_ascii_control() => {
                let _ = write!(q, "\\x{:02x}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// `YYYY-MM-DD HH:MM:SS.uuuuuu` in UTC, as nbdkit's log filter writes it.
fn timestamp(now: SystemTime) -> String {
    // A clock before 1970 is not worth failing a request over: print the epoch.
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days(secs / 86_400);
    let sod = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}.{:06}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard Hinnant's
/// `civil_from_days`; std has no calendar and this is all the filter needs of one.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of the 400-year era
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year starting 1 March
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::error::Errno;
    use blocksmith_core::layer::BlockSize;
    use blocksmith_core::sched::SimScheduler;
    use std::path::PathBuf;
    use std::time::Duration;

    /// A log file path unique to this test, removed when dropped.
    struct TempLog(PathBuf);

    impl TempLog {
        fn new(name: &str) -> TempLog {
            let p = std::env::temp_dir().join(format!("blocksmith-log-{}-{name}.log", std::process::id()));
            let _ = std::fs::remove_file(&p);
            TempLog(p)
        }
        fn path(&self) -> &str {
            self.0.to_str().expect("utf-8 temp path")
        }
        /// The lines written, each checked for and stripped of its timestamp.
        fn lines(&self) -> Vec<String> {
            let text = std::fs::read_to_string(&self.0).expect("log file readable");
            assert!(text.ends_with('\n'));
            text.lines()
                .map(|l| {
                    let (ts, rest) = l.split_at(26);
                    assert!(is_timestamp(ts), "bad timestamp in {l:?}");
                    rest.strip_prefix(' ').expect("space after timestamp").to_owned()
                })
                .collect()
        }
    }

    impl Drop for TempLog {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn is_timestamp(s: &str) -> bool {
        let b = s.as_bytes();
        let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22, 23, 24, 25];
        b.len() == 26
            && digits.iter().all(|&i| b[i].is_ascii_digit())
            && (b[4], b[7], b[10], b[13], b[16], b[19]) == (b'-', b'-', b' ', b':', b':', b'.')
    }

    #[test]
    fn logs_a_session_in_nbdkit_format() {
        let log = TempLog::new("session");
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        let f = configure(&SPEC, &[("logfile", log.path())]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();

        wait(&sim, |d| top.pread(vec![0; 512], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 512], 4096, Flags::FUA, d)).unwrap();
        wait(&sim, |d| top.zero(4096, 8192, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.zero(4096, 8192, Flags::MAY_TRIM | Flags::FUA | Flags::FAST_ZERO, d)).unwrap();
        wait(&sim, |d| top.trim(4096, 8192, Flags::FUA, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.cache(4096, 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.extents(65536, 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.extents(65536, 8192, Flags::REQ_ONE, d)).unwrap();
        top.close();

        assert_eq!(
            log.lines(),
            [
                "connection=1 Connect export=\"\" tls=0 size=0x100000 minsize=0x0 prefsize=0x0 maxsize=0x0 \
                 write=1 flush=1 rotational=0 trim=1 zero=2 fua=2 extents=1 cache=2 fast_zero=1",
                "connection=1 Read id=1 offset=0x0 count=0x200 ...",
                "connection=1 ...Read id=1 return=0",
                "connection=1 Write id=2 offset=0x1000 count=0x200 fua=1 ...",
                "connection=1 ...Write id=2 return=0",
                "connection=1 Zero id=3 offset=0x2000 count=0x1000 trim=0 fua=0 fast=0 ...",
                "connection=1 ...Zero id=3 return=0",
                "connection=1 Zero id=4 offset=0x2000 count=0x1000 trim=1 fua=1 fast=1 ...",
                "connection=1 ...Zero id=4 return=0",
                "connection=1 Trim id=5 offset=0x2000 count=0x1000 fua=1 ...",
                "connection=1 ...Trim id=5 return=0",
                "connection=1 Flush id=6 ...",
                "connection=1 ...Flush id=6 return=0",
                "connection=1 Cache id=7 offset=0x0 count=0x1000 ...",
                "connection=1 ...Cache id=7 return=0",
                "connection=1 Extents id=8 offset=0x0 count=0x10000 req_one=0 ...",
                "connection=1 ...Extents id=8 extents=(0x0 0x1000 \"\" 0x1000 0xff000 \"hole,zero\") return=0",
                "connection=1 Extents id=9 offset=0x2000 count=0x10000 req_one=1 ...",
                // The shim below has already cut a REQ_ONE answer to the request; nbdkit would log
                // what the plugin returned (here 0xfe000 bytes).
                "connection=1 ...Extents id=9 extents=(0x2000 0x10000 \"hole,zero\") return=0",
                "connection=1 Disconnect transactions=9",
            ]
        );
        // The requests themselves went through unchanged.
        assert_eq!(ram.calls()[..3], ["pread 512@0", "pwrite 512@4096 flags=1", "zero 4096@8192 flags=0"]);
    }

    #[test]
    fn failures_and_emulated_operations() {
        let log = TempLog::new("failures");
        let sim = SimScheduler::new();
        let ram = Ram::with(65536, |r| {
            r.fail_at = Some(1000);
            r.info.fua = Support::Emulate;
            r.info.zero = Support::Emulate;
            r.info.can_fast_zero = false;
            r.info.cache = Support::Emulate;
            r.info.block_size = Some(BlockSize { minimum: 1, preferred: 4096, maximum: 1 << 25 });
            r.info.is_rotational = true;
        });
        let top = open(&configure(&SPEC, &[("logfile", log.path())]), &cx(&sim), ram.clone()).unwrap();

        let e = wait(&sim, |d| top.pread(vec![0; 512], 512, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Io, "the error reaches the client unchanged");
        // FUA and zero are emulated by the shim below, which therefore offers them to this filter
        // as native (2 in the Connect line, where nbdkit would print 1 for emulation): they are
        // logged as the client's requests, not as the writes and flushes that emulate them.
        wait(&sim, |d| top.pwrite(vec![1; 8], 0, Flags::FUA, d)).unwrap();
        wait(&sim, |d| top.zero(16, 0, Flags::NONE, d)).unwrap();
        let e = wait(&sim, |d| top.zero(16, 0, Flags::FAST_ZERO, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        wait(&sim, |d| top.cache(512, 2048, Flags::NONE, d)).unwrap();
        top.close();

        assert_eq!(
            log.lines(),
            [
                "connection=1 Connect export=\"\" tls=0 size=0x10000 minsize=0x1 prefsize=0x1000 \
                 maxsize=0x2000000 write=1 flush=1 rotational=1 trim=1 zero=2 fua=2 extents=1 cache=2 \
                 fast_zero=1",
                "connection=1 Read id=1 offset=0x200 count=0x200 ...",
                "connection=1 ...Read id=1 return=-1 error=EIO",
                "connection=1 Write id=2 offset=0x0 count=0x8 fua=1 ...",
                "connection=1 ...Write id=2 return=0",
                "connection=1 Zero id=3 offset=0x0 count=0x10 trim=0 fua=0 fast=0 ...",
                "connection=1 ...Zero id=3 return=0",
                "connection=1 Zero id=4 offset=0x0 count=0x10 trim=0 fua=0 fast=1 ...",
                "connection=1 ...Zero id=4 return=-1 error=ENOTSUP",
                "connection=1 Cache id=5 offset=0x800 count=0x200 ...",
                "connection=1 ...Cache id=5 return=0",
                "connection=1 Disconnect transactions=5",
            ]
        );
        assert_eq!(
            ram.calls(),
            ["pread 512@512", "pwrite 8@0 flags=0", "flush", "pwrite 16@0 flags=0", "pread 512@2048"]
        );
    }

    #[test]
    fn connections_are_numbered_and_share_the_file() {
        let log = TempLog::new("conns");
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[("logfile", log.path())]);
        let mut c2 = cx(&sim);
        c2.export_name = "disk 2".into();
        c2.readonly = true;
        c2.is_tls = true;
        let a = open(&f, &cx(&sim), Ram::new(4096)).unwrap();
        let b = open(&f, &c2, Ram::new(4096)).unwrap();
        wait(&sim, |d| a.flush(Flags::NONE, d)).unwrap();
        wait(&sim, |d| b.pread(vec![0; 1], 1, Flags::NONE, d)).unwrap();
        wait(&sim, |d| a.flush(Flags::NONE, d)).unwrap();
        b.close();
        drop(a); // dropped without close: still gets its Disconnect line
        assert_eq!(
            log.lines(),
            [
                "connection=1 Connect export=\"\" tls=0 size=0x1000 minsize=0x0 prefsize=0x0 maxsize=0x0 \
                 write=1 flush=1 rotational=0 trim=1 zero=2 fua=2 extents=1 cache=2 fast_zero=1",
                "connection=2 Connect export=\"disk 2\" tls=1 size=0x1000 minsize=0x0 prefsize=0x0 maxsize=0x0 \
                 write=0 flush=1 rotational=0 trim=0 zero=0 fua=0 extents=1 cache=2 fast_zero=0",
                "connection=1 Flush id=1 ...",
                "connection=1 ...Flush id=1 return=0",
                "connection=2 Read id=1 offset=0x1 count=0x1 ...",
                "connection=2 ...Read id=1 return=0",
                "connection=1 Flush id=2 ...",
                "connection=1 ...Flush id=2 return=0",
                "connection=2 Disconnect transactions=1",
                "connection=1 Disconnect transactions=2",
            ]
        );
    }

    #[test]
    fn concurrent_requests_pair_by_id() {
        // Two requests in flight at once, completing in the opposite order (the second waits
        // less under the delay filter below the log filter).
        let log = TempLog::new("interleave");
        let sim = SimScheduler::new();
        let delay = configure(&crate::delay::SPEC, &[("delay-read", "10ms"), ("delay-write", "5ms")]);
        let below = crate::testutil::open(&delay, &cx(&sim), Ram::new(4096)).unwrap();
        let top = open(&configure(&SPEC, &[("logfile", log.path())]), &cx(&sim), below).unwrap();
        top.pread(vec![0; 1], 0, Flags::NONE, Done::new(|r: Result<Vec<u8>, NbdError>| assert!(r.is_ok())));
        top.pwrite(vec![0; 1], 0, Flags::NONE, Done::new(|r: Result<(), NbdError>| assert!(r.is_ok())));
        sim.run_until_idle();
        assert_eq!(sim.elapsed(), Duration::from_millis(10));
        assert_eq!(
            log.lines()[1..],
            [
                "connection=1 Read id=1 offset=0x0 count=0x1 ...",
                "connection=1 Write id=2 offset=0x0 count=0x1 fua=0 ...",
                "connection=1 ...Write id=2 return=0",
                "connection=1 ...Read id=1 return=0",
            ]
        );
    }

    #[test]
    fn logappend() {
        let log = TempLog::new("append");
        std::fs::write(&log.0, "old line\n").unwrap();
        let sim = SimScheduler::new();
        drop(open(
            &configure(&SPEC, &[("logfile", log.path()), ("logappend", "true")]),
            &cx(&sim),
            Ram::new(512),
        ));
        let text = std::fs::read_to_string(&log.0).unwrap();
        assert!(text.starts_with("old line\n"), "{text}");
        assert_eq!(text.lines().count(), 3);
        // Without logappend the file is truncated when the filter is configured.
        configure(&SPEC, &[("logfile", log.path())]);
        assert_eq!(std::fs::read_to_string(&log.0).unwrap(), "");
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(make_err(&SPEC, &[]), "log: missing required parameter logfile=");
        let e = make_err(&SPEC, &[("logfile", "/nonexistent-dir/x.log")]);
        assert!(e.starts_with("log: cannot open logfile '/nonexistent-dir/x.log': "), "{e}");
        let log = TempLog::new("badparams");
        let e = make_err(&SPEC, &[("logfile", log.path()), ("logappend", "sometimes")]);
        assert!(e.starts_with("log: logappend: could not parse boolean 'sometimes'"), "{e}");
        let e = make_err(&SPEC, &[("logscript", "echo $act")]);
        assert!(e.contains("logscript= is not supported"), "{e}");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(""), "\"\"");
        assert_eq!(shell_quote("disk-1.img"), "disk-1.img");
        assert_eq!(shell_quote("/a/b=c,d:e_f"), "/a/b=c,d:e_f");
        assert_eq!(shell_quote("a b"), "\"a b\"");
        assert_eq!(shell_quote("$x`y`\\\"z"), "\"\\$x\\`y\\`\\\\\\\"z\"");
        assert_eq!(shell_quote("a\nconnection=9 Forged"), "\"a\\x0aconnection=9 Forged\"");
        assert_eq!(shell_quote("é"), "\"é\"");
    }

    #[test]
    fn timestamps_are_utc() {
        let t =
            |secs: u64, micros: u64| timestamp(UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros));
        assert_eq!(t(0, 0), "1970-01-01 00:00:00.000000");
        // The example in nbdkit's manual page.
        assert_eq!(t(1_596_679_643, 80_415), "2020-08-06 02:07:23.080415");
        assert_eq!(t(951_782_400, 1), "2000-02-29 00:00:00.000001");
        assert_eq!(t(4_107_542_399, 999_999), "2100-02-28 23:59:59.999999");
        assert_eq!(t(4_107_542_400, 0), "2100-03-01 00:00:00.000000");
        assert!(is_timestamp(&timestamp(SystemTime::now())));
    }

    #[test]
    fn extent_types() {
        let mut e = Extents::new();
        e.push(1, 0);
        e.push(2, EXTENT_HOLE);
        e.push(3, EXTENT_ZERO);
        e.push(4, EXTENT_HOLE | EXTENT_ZERO);
        assert_eq!(
            extent_list(16, &e),
            "0x10 0x1 \"\" 0x11 0x2 \"hole\" 0x13 0x3 \"zero\" 0x16 0x4 \"hole,zero\""
        );
    }
}
