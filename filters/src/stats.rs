//! The stats filter (nbdkit-stats-filter): count operations, bytes and time per kind of request,
//! with a breakdown of request sizes and alignments, and write them to `statsfile=` in
//! nbdkit's format:
//!
//! ```text
//! total: 8 ops, 0.016615 s, 1.13 MiB, 68.25 MiB/s
//! write: 3 ops, 0.000266 s, 65.18 KiB, 239.31 MiB/s op, 3.83 MiB/s total
//!   Request size and alignment breakdown:
//!      9 bits: 66.7% (2 reqs, 1.18 KiB total)
//!           3 bit aligned: 100.0% (2)
//!          12 bit aligned:  50.0% (1)
//!     other sizes: 33.3% (1 reqs, 65.18 KiB total)
//! ```
//!
//! "N bits" groups requests of 2^N to 2^(N+1)-1 bytes; "N bit aligned" counts those whose
//! offset is a multiple of 2^N. The most common sizes are listed as long as together they cover
//! at most `statsthreshold` percent of the requests (default 95); the rest are "other sizes". Only
//! successful requests count; time is the time from a request entering this filter to its
//! completion, summed. (nbdkit 1.32 prints the bytes of all the operation's requests on the
//! "other sizes" line; here it is the bytes of those other sizes.)
//!
//! The file is written when the server exits (when the filter's factory is dropped), as in
//! nbdkit; on demand when the server gets SIGUSR1 (from the signal thread); and, off the event
//! loop, each time a connection closes, so it is current whenever the server is idle. Each write replaces the previous one; with `statsappend=true` the file's
//! earlier contents are kept and only this run's block is replaced.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
};
use blocksmith_core::sched::Sched;

pub const SPEC: FilterSpec =
    FilterSpec { name: "stats", summary: "write statistics about requests to a file", params: PARAMS, make };

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "statsfile",
        help: "(required) The file to write the statistics to, when the server exits\n\
               and each time a connection closes.",
    },
    ParamSpec { name: "statsappend", help: "true: append to the file instead of replacing it." },
    ParamSpec {
        name: "statsthreshold",
        help: "Percentage of requests (0-100, default 95) the size breakdown lists\n\
               individually; the rest are grouped as other sizes.",
    },
];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let path = p
        .take("statsfile")
        .ok_or_else(|| ConfigError::new("stats: missing required parameter statsfile="))?;
    let append =
        p.take_bool("statsappend").map_err(|e| ConfigError::new(format!("stats: {}", e.0)))?.unwrap_or(false);
    let threshold = match p.take("statsthreshold") {
        None => 95,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(t) if t <= 100 => t,
            _ => {
                return Err(ConfigError::new(format!(
                    "stats: statsthreshold must be a percentage between 0 and 100 (got '{v}')"
                )))
            }
        },
    };
    // Opened now, so a bad path stops the server at start-up, as in nbdkit.
    let mut opts = OpenOptions::new();
    opts.create(true).write(true);
    if !append {
        opts.truncate(true);
    }
    let file = opts
        .open(&path)
        .map_err(|e| ConfigError::new(format!("stats: cannot open statsfile '{path}': {e}")))?;
    let start = if append {
        file.metadata().map_err(|e| ConfigError::new(format!("stats: statsfile '{path}': {e}")))?.len()
    } else {
        0
    };
    let out = Arc::new(StatsFile { file: Mutex::new(file), start, path });
    let stats = Arc::new(Stats { started: Instant::now(), threshold, ops: Mutex::new(Ops::default()) });
    // On demand: `kill -USR1` the server and the file is written now (from the signal thread,
    // not an event loop). Weak, so the hook does not keep the statistics alive after exit.
    let (weak_stats, weak_out) = (Arc::downgrade(&stats), Arc::downgrade(&out));
    blocksmith_core::control::on_report(Box::new(move || {
        if let (Some(s), Some(o)) = (weak_stats.upgrade(), weak_out.upgrade()) {
            o.write(&s.report(Instant::now()));
        }
    }));
    Ok(Arc::new(StatsFactory { stats, out }))
}

/// Where the report goes: `start` is where this run's block begins (0 unless appending).
struct StatsFile {
    file: Mutex<File>,
    start: u64,
    path: String,
}

impl StatsFile {
    /// Replace this run's block with `text`. Blocking: called from the pool or at exit.
    fn write(&self, text: &str) {
        let f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let r = f.set_len(self.start).and_then(|()| f.write_all_at(text.as_bytes(), self.start));
        if let Err(e) = r {
            ::log::warn!("stats: cannot write {}: {e}", self.path);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Read,
    Write,
    Trim,
    Zero,
    Extents,
    Cache,
    Flush,
}

impl Op {
    const ALL: [Op; 7] = [Op::Read, Op::Write, Op::Trim, Op::Zero, Op::Extents, Op::Cache, Op::Flush];
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::Zero => "zero",
            Op::Extents => "extents",
            Op::Cache => "cache",
            Op::Flush => "flush",
        }
    }
}

/// Requests of one size class (2^bits to 2^(bits+1)-1 bytes).
#[derive(Clone, Debug)]
struct Bucket {
    count: u64,
    bytes: u64,
    /// `aligned[n]`: requests whose offset is a multiple of 2^n.
    aligned: [u64; 64],
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket { count: 0, bytes: 0, aligned: [0; 64] }
    }
}

#[derive(Clone, Debug, Default)]
struct OpStats {
    ops: u64,
    bytes: u64,
    time: Duration,
    sizes: BTreeMap<u32, Bucket>,
}

#[derive(Default)]
struct Ops(BTreeMap<Op, OpStats>);

/// Everything counted, shared by every connection on every loop.
struct Stats {
    started: Instant,
    threshold: u32,
    ops: Mutex<Ops>,
}

impl Stats {
    fn record(&self, op: Op, count: u64, offset: u64, took: Duration) {
        let mut ops = self.ops.lock().unwrap_or_else(PoisonError::into_inner);
        let s = ops.0.entry(op).or_default();
        s.ops += 1;
        s.bytes = s.bytes.saturating_add(count);
        s.time += took;
        if op != Op::Flush && count > 0 {
            let b = s.sizes.entry(63 - count.leading_zeros()).or_default();
            b.count += 1;
            b.bytes = b.bytes.saturating_add(count);
            let align = offset.trailing_zeros().min(63) as usize;
            for a in b.aligned.iter_mut().take(align + 1) {
                *a += 1;
            }
        }
    }

    /// The report, as of now.
    fn report(&self, now: Instant) -> String {
        let ops = self.ops.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let mut s = String::new();
        let total_ops: u64 = ops.0.values().map(|o| o.ops).sum();
        let total_bytes: u64 = ops.0.values().map(|o| o.bytes).fold(0, u64::saturating_add);
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "total: {total_ops} ops, {elapsed:.6} s, {}, {}/s",
            human(total_bytes as f64),
            human(rate(total_bytes, elapsed))
        );
        for op in Op::ALL {
            let Some(o) = ops.0.get(&op).filter(|o| o.ops > 0) else { continue };
            let op_time = o.time.as_secs_f64();
            // As nbdkit: no rate for operations that move no bytes (flush) or took no time.
            let per_op = if op_time > 0.0 && o.bytes > 0 {
                human(rate(o.bytes, op_time))
            } else {
                "(n/a)".to_string()
            };
            let _ = writeln!(
                s,
                "{}: {} ops, {op_time:.6} s, {}, {per_op}/s op, {}/s total",
                op.name(),
                o.ops,
                human(o.bytes as f64),
                human(rate(o.bytes, elapsed))
            );
            if !o.sizes.is_empty() {
                breakdown(&mut s, o, self.threshold);
                s.push('\n');
            }
        }
        s
    }
}

fn rate(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs
    } else {
        0.0
    }
}

/// `1.13 MiB`, `0 bytes`, as nbdkit prints sizes.
fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024.0 {
        return format!("{} bytes", bytes as u64);
    }
    let mut v = bytes / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

fn breakdown(s: &mut String, o: &OpStats, threshold: u32) {
    let _ = writeln!(s, "  Request size and alignment breakdown:");
    let total: u64 = o.sizes.values().map(|b| b.count).sum();
    let pct = |n: u64| 100.0 * n as f64 / total as f64;
    let mut buckets: Vec<(&u32, &Bucket)> = o.sizes.iter().collect();
    // Most common first; equally common, smaller first.
    buckets.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let mut shown = 0u64;
    let mut rest = buckets.into_iter().peekable();
    // As nbdkit: a size is listed only if the listed sizes then still cover at most `threshold`
    // percent of the requests (so a single size used by every request is "other sizes").
    while let Some((bits, b)) = rest.next_if(|(_, b)| pct(shown + b.count) <= f64::from(threshold)) {
        let _ = writeln!(
            s,
            "    {bits:2} bits: {:4.1}% ({} reqs, {} total)",
            pct(b.count),
            b.count,
            human(b.bytes as f64)
        );
        // For each distinct count, the largest alignment that many requests share.
        for n in 0..64 {
            let c = b.aligned[n];
            if c > 0 && (n == 63 || b.aligned[n + 1] < c) {
                let _ = writeln!(
                    s,
                    "         {n:2} bit aligned: {:5.1}% ({c})",
                    100.0 * c as f64 / b.count as f64
                );
            }
        }
        shown += b.count;
    }
    let (n, bytes) = rest.fold((0u64, 0u64), |(n, by), (_, b)| (n + b.count, by.saturating_add(b.bytes)));
    if n > 0 {
        let _ = writeln!(s, "    other sizes: {:4.1}% ({n} reqs, {} total)", pct(n), human(bytes as f64));
    }
}

struct StatsFactory {
    stats: Arc<Stats>,
    out: Arc<StatsFile>,
}

impl Drop for StatsFactory {
    /// The server is exiting (every stack, so every connection, is gone): the final report.
    fn drop(&mut self) {
        self.out.write(&self.stats.report(Instant::now()));
    }
}

impl FilterFactory for StatsFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let filter =
            StatsFilter { stats: self.stats.clone(), out: self.out.clone(), sched: cx.sched.clone() };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

struct StatsFilter {
    stats: Arc<Stats>,
    out: Arc<StatsFile>,
    sched: Sched,
}

impl StatsFilter {
    /// Wrap `done` to record the request if it succeeds.
    fn timed<T: 'static>(&self, op: Op, count: u64, offset: u64, done: Done<T>) -> Done<T> {
        let (stats, start) = (self.stats.clone(), Instant::now());
        Done::new(move |r: Result<T, NbdError>| {
            if r.is_ok() {
                stats.record(op, count, offset, start.elapsed());
            }
            done.call(r)
        })
    }
}

impl Filter for StatsFilter {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let done = self.timed(Op::Read, buf.len() as u64, offset, done);
        next.pread(buf, offset, flags, done)
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let done = self.timed(Op::Write, data.len() as u64, offset, done);
        next.pwrite(data, offset, flags, done)
    }

    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        next.flush(flags, self.timed(Op::Flush, 0, 0, done))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.trim(count, offset, flags, self.timed(Op::Trim, count, offset, done))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.zero(count, offset, flags, self.timed(Op::Zero, count, offset, done))
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        next.extents(count, offset, flags, self.timed(Op::Extents, count, offset, done))
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.cache(count, offset, flags, self.timed(Op::Cache, count, offset, done))
    }

    fn close(&self, next: &Next) {
        // Refresh the file with what is known so far (formatted here, written off the loop).
        let (text, out) = (self.stats.report(Instant::now()), self.out.clone());
        self.sched.blocking(move || out.write(&text), |()| {});
        next.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;
    use std::path::PathBuf;

    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str) -> Temp {
            Temp(std::env::temp_dir().join(format!("blocksmith-stats-{}-{name}", std::process::id())))
        }
        fn path(&self) -> &str {
            self.0.to_str().expect("utf-8 temp path")
        }
        fn read(&self) -> String {
            std::fs::read_to_string(&self.0).expect("stats file")
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn counts_sizes_and_alignment_in_nbdkit_format() {
        let t = Temp::new("format");
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[("statsfile", t.path())]);
        let top = open(&f, &cx(&sim), Ram::with(1 << 20, |r| r.fail_at = Some(900_000))).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 65536], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![2; 512], 4096, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![3; 700], 1000, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pread(vec![0; 4096], 8192, Flags::NONE, d)).unwrap();
        assert!(wait(&sim, |d| top.pread(vec![0; 4096], 899_000, Flags::NONE, d)).is_err());
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.zero(8192, 0, Flags::NONE, d)).unwrap();
        drop(top);
        drop(f);
        let text = t.read();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("total: 6 ops, "), "{text}");
        assert!(lines[0].contains(" s, 77.18 KiB, "), "{text}");
        assert!(lines[1].starts_with("read: 1 ops, "), "failures are not counted: {text}");
        assert_eq!(lines[2], "  Request size and alignment breakdown:");
        // One size is 100% of the reads, above the 95% threshold: nbdkit lists it as other.
        assert_eq!(lines[3], "    other sizes: 100.0% (1 reqs, 4.00 KiB total)");
        assert_eq!(lines[4], "");
        assert!(lines[5].starts_with("write: 3 ops, "), "{text}");
        assert!(lines[5].contains(", 65.18 KiB, "), "{text}");
        assert_eq!(
            lines[6..12],
            [
                "  Request size and alignment breakdown:",
                "     9 bits: 66.7% (2 reqs, 1.18 KiB total)",
                "          3 bit aligned: 100.0% (2)",
                "         12 bit aligned:  50.0% (1)",
                "    other sizes: 33.3% (1 reqs, 64.00 KiB total)",
                "",
            ]
        );
        assert!(lines[12].starts_with("zero: 1 ops, "), "{text}");
        assert!(lines.last().unwrap().starts_with("flush: 1 ops, "), "{text}");
        assert!(lines.last().unwrap().contains(", 0 bytes, "), "{text}");
    }

    #[test]
    fn threshold_100_lists_every_size_and_close_refreshes_the_file() {
        let t = Temp::new("threshold");
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[("statsfile", t.path()), ("statsthreshold", "100")]);
        let top = open(&f, &cx(&sim), Ram::new(1 << 20)).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 65536], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![2; 512], 4096, Flags::NONE, d)).unwrap();
        top.close();
        sim.run_until_idle();
        let text = t.read();
        assert!(
            text.contains("    16 bits: 50.0% (1 reqs, 64.00 KiB total)\n         63 bit aligned"),
            "{text}"
        );
        assert!(
            text.contains("     9 bits: 50.0% (1 reqs, 512 bytes total)\n         12 bit aligned"),
            "{text}"
        );
        assert!(!text.contains("other sizes"), "{text}");
    }

    #[test]
    fn append_keeps_what_was_there() {
        let t = Temp::new("append");
        std::fs::write(&t.0, "earlier run\n").unwrap();
        let f = configure(&SPEC, &[("statsfile", t.path()), ("statsappend", "true")]);
        drop(f);
        let text = t.read();
        assert!(text.starts_with("earlier run\ntotal: 0 ops, "), "{text}");
        assert_eq!(text.lines().count(), 2);
        drop(configure(&SPEC, &[("statsfile", t.path())]));
        assert!(t.read().starts_with("total: 0 ops"), "without statsappend the file is replaced");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0.0), "0 bytes");
        assert_eq!(human(1023.0), "1023 bytes");
        assert_eq!(human(1024.0), "1.00 KiB");
        assert_eq!(human(1.13 * 1048576.0), "1.13 MiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0), "3.00 TiB");
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(make_err(&SPEC, &[]), "stats: missing required parameter statsfile=");
        assert!(make_err(&SPEC, &[("statsfile", "/nonexistent-dir/s.txt")])
            .starts_with("stats: cannot open statsfile"));
        let t = Temp::new("bad");
        assert!(make_err(&SPEC, &[("statsfile", t.path()), ("statsthreshold", "101")])
            .contains("between 0 and 100"));
        assert!(make_err(&SPEC, &[("statsfile", t.path()), ("statsappend", "x")])
            .contains("could not parse boolean"));
    }
}
