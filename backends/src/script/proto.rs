//! The text side of nbdkit's script calling convention: what exit codes mean, errno names on
//! stderr, the flags argument, and the output formats of the methods that print something.

use blocksmith_core::config::parse_size;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{BlockSize, Extents, Flags, Support};
use blocksmith_core::NbdError;

use super::child::Exit;

/// What a run of a method says, once its exit code is interpreted.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Exit 0 (also 4 and 7, which add a side effect).
    Ok,
    /// Exit 2: the script does not implement the method; the caller applies nbdkit's default.
    Missing,
    /// Exit 3: false, for the methods that answer a question.
    False,
    Err(NbdError),
}

/// Side effects of exit codes 4 to 8 (nbdkit >= 1.34): shut the server down, or stop serving
/// this client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    pub shutdown: bool,
    pub disconnect: bool,
}

/// Interpret how a run ended, as nbdkit's sh plugin does:
/// 0 ok, 1 and 9+ error, 2 missing, 3 false, 4 shutdown then ok, 5 shutdown then error,
/// 6 hard disconnect, 7 soft disconnect then ok, 8 soft disconnect then error.
/// Codes 5 and 8 with nothing on stderr mean ESHUTDOWN, other errors EIO.
pub(crate) fn classify(method: &str, exit: &Exit, stderr: &[u8]) -> (Reply, Effects) {
    let none = Effects::default();
    match exit {
        Exit::Code(0) => (Reply::Ok, none),
        Exit::Code(2) => (Reply::Missing, none),
        Exit::Code(3) => (Reply::False, none),
        Exit::Code(4) => (Reply::Ok, Effects { shutdown: true, disconnect: false }),
        Exit::Code(5) => (
            Reply::Err(script_error(method, stderr, Errno::Shutdown)),
            Effects { shutdown: true, disconnect: false },
        ),
        // The connection is dropped without a reply (the caller asks for it); were it to
        // linger, this request and every later one fail with ESHUTDOWN.
        Exit::Code(6) => (
            Reply::Err(NbdError::msg(
                Errno::Shutdown,
                format!("{method}: the script disconnected the client"),
            )),
            Effects { shutdown: false, disconnect: true },
        ),
        Exit::Code(7) => (Reply::Ok, Effects { shutdown: false, disconnect: true }),
        Exit::Code(8) => (
            Reply::Err(script_error(method, stderr, Errno::Shutdown)),
            Effects { shutdown: false, disconnect: true },
        ),
        Exit::Code(_) => (Reply::Err(script_error(method, stderr, Errno::Io)), none),
        Exit::Signal(s) => {
            (Reply::Err(NbdError::io(format!("{method}: the script was terminated by signal {s}"))), none)
        }
        Exit::TimedOut(d) => (
            Reply::Err(NbdError::io(format!(
                "{method}: the script timed out after {} and was killed",
                secs(*d)
            ))),
            none,
        ),
        Exit::Failed(m) => (Reply::Err(NbdError::io(m.clone())), none),
    }
}

fn secs(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s}s")
    }
}

/// The error a failing script reports: an errno name first on stderr (any case, then
/// whitespace or the end), optionally followed by a message. Anything else is `default`, with
/// the first line of stderr as the message.
pub(crate) fn script_error(method: &str, stderr: &[u8], default: Errno) -> NbdError {
    let text = String::from_utf8_lossy(stderr);
    let first = text.trim_end_matches('\n').lines().next().unwrap_or("");
    if first.is_empty() {
        let msg = match default {
            Errno::Shutdown => format!("{method}: the script asked for a shutdown"),
            _ => format!("{method}: the script exited with an error but printed nothing on stderr"),
        };
        return NbdError::msg(default, msg);
    }
    // No trimming at the front: nbdkit only recognises a name at the very start.
    let (word, rest) = match first.find(char::is_whitespace) {
        Some(i) => (&first[..i], first[i..].trim()),
        None => (first, ""),
    };
    match Errno::from_name(word).filter(|_| !word.is_empty()) {
        Some(e) if rest.is_empty() => NbdError::msg(e, format!("{method}: {}", word.to_ascii_uppercase())),
        Some(e) => NbdError::msg(e, format!("{method}: {rest}")),
        None => NbdError::msg(default, format!("{method}: {first}")),
    }
}

/// The error for an exit code the method does not allow (3 for a method that is not a question).
pub(crate) fn unexpected_false(method: &str) -> NbdError {
    NbdError::io(format!("{method}: the script returned unexpected code (3/false)"))
}

/// The flags argument: `fua`, `may_trim`, `req_one`, `fast`, comma-separated, in nbdkit's order.
pub(crate) fn flags_arg(flags: Flags) -> String {
    let mut v = Vec::new();
    for (f, name) in [
        (Flags::FUA, "fua"),
        (Flags::MAY_TRIM, "may_trim"),
        (Flags::REQ_ONE, "req_one"),
        (Flags::FAST_ZERO, "fast"),
    ] {
        if flags.contains(f) {
            v.push(name);
        }
    }
    v.join(",")
}

/// Output as text with one final newline removed (how nbdkit reads handles and names).
pub(crate) fn chomp(out: &[u8]) -> String {
    let s = String::from_utf8_lossy(out);
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

fn bad_output(method: &str, out: &[u8]) -> NbdError {
    let mut s = chomp(out);
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    NbdError::io(format!("{method}: could not parse the script's output: '{s}'"))
}

/// get_size: a size, with nbdkit's suffixes.
pub(crate) fn parse_size_output(method: &str, out: &[u8]) -> Result<u64, NbdError> {
    parse_size(chomp(out).trim()).map_err(|_| bad_output(method, out))
}

/// can_fua and can_cache print `none`, `emulate` or `native`.
pub(crate) fn parse_support(method: &str, out: &[u8]) -> Result<Support, NbdError> {
    match chomp(out).trim().to_ascii_lowercase().as_str() {
        "none" => Ok(Support::None),
        "emulate" => Ok(Support::Emulate),
        "native" => Ok(Support::Native),
        _ => Err(bad_output(method, out)),
    }
}

/// nbdkit's thread models, from the least to the most parallel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ThreadModel {
    SerializeConnections,
    SerializeAllRequests,
    SerializeRequests,
    Parallel,
}

impl ThreadModel {
    /// What `thread_model` printed; anything unrecognised is the safe default, as in nbdkit.
    pub(crate) fn parse(out: &[u8]) -> ThreadModel {
        match chomp(out).trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "parallel" => ThreadModel::Parallel,
            "serialize_requests" => ThreadModel::SerializeRequests,
            "serialize_connections" => ThreadModel::SerializeConnections,
            "serialize_all_requests" => ThreadModel::SerializeAllRequests,
            other => {
                log::debug!("ignoring unrecognised thread model '{other}'");
                ThreadModel::SerializeAllRequests
            }
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ThreadModel::SerializeConnections => "serialize_connections",
            ThreadModel::SerializeAllRequests => "serialize_all_requests",
            ThreadModel::SerializeRequests => "serialize_requests",
            ThreadModel::Parallel => "parallel",
        }
    }
}

/// extents: lines of `offset length [type]`, the type a number or words containing `hole`
/// and `zero`. The extents must run on from each other (as nbdkit_add_extent demands); those
/// ending before `offset` are skipped and the first that counts is clipped to start there.
pub(crate) fn parse_extents(out: &[u8], offset: u64) -> Result<Extents, NbdError> {
    let text = String::from_utf8_lossy(out);
    let mut extents = Extents::new();
    let mut pos = offset;
    let mut started = false;
    for line in text.lines() {
        let mut it = line.split([' ', '\t']).filter(|w| !w.is_empty());
        let Some(first) = it.next() else {
            return Err(NbdError::io(format!("extents: cannot parse '{line}'")));
        };
        let bad = || NbdError::io(format!("extents: cannot parse '{line}'"));
        let start = parse_size(first).map_err(|_| bad())?;
        let length = parse_size(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let kind = match it.next() {
            None => 0,
            Some(w) => match w.parse::<u32>() {
                Ok(n) => n,
                Err(_) => {
                    let mut k = 0;
                    if w.contains("hole") {
                        k |= blocksmith_core::layer::EXTENT_HOLE;
                    }
                    if w.contains("zero") {
                        k |= blocksmith_core::layer::EXTENT_ZERO;
                    }
                    k
                }
            },
        };
        let end = start.checked_add(length).ok_or_else(bad)?;
        if length == 0 || end <= pos {
            continue;
        }
        if start > pos {
            return Err(NbdError::io(if started {
                format!("extents: extents are not contiguous at {pos} (next one starts at {start})")
            } else {
                format!("extents: the first extent starts at {start}, after the requested offset {offset}")
            }));
        }
        // Only the two base:allocation bits mean anything on the wire.
        extents.push(
            end - pos,
            kind & (blocksmith_core::layer::EXTENT_HOLE | blocksmith_core::layer::EXTENT_ZERO),
        );
        pos = end;
        started = true;
    }
    if !started {
        return Err(NbdError::io(format!(
            "extents: the script described nothing at or after offset {offset}"
        )));
    }
    Ok(extents)
}

/// list_exports (and default_export): names, with an optional first line choosing the layout:
/// `NAMES`, `INTERLEAVED` (name, description, name, ...), `NAMES+DESCRIPTIONS` (all names,
/// then all descriptions). Without one of those, every line is a name.
pub(crate) fn parse_export_list(out: &[u8]) -> Result<Vec<(String, Option<String>)>, String> {
    let text = chomp(out);
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let (mode, rest) = match lines[0] {
        "NAMES" | "INTERLEAVED" | "NAMES+DESCRIPTIONS" => (lines[0], &lines[1..]),
        _ => ("NAMES", &lines[..]),
    };
    let owned = |s: &&str| s.to_string();
    Ok(match mode {
        "INTERLEAVED" => {
            if rest.len() % 2 != 0 {
                return Err("INTERLEAVED export list with a name and no description".into());
            }
            rest.chunks(2).map(|p| (p[0].to_string(), Some(p[1].to_string()))).collect()
        }
        "NAMES+DESCRIPTIONS" => {
            if rest.len() % 2 != 0 {
                return Err("NAMES+DESCRIPTIONS export list with an odd number of lines".into());
            }
            let (names, descs) = rest.split_at(rest.len() / 2);
            names.iter().map(owned).zip(descs.iter().map(|d| Some(d.to_string()))).collect()
        }
        _ => rest.iter().map(|n| (n.to_string(), None)).collect(),
    })
}

/// block_size: minimum, preferred and maximum, checked as nbdkit checks them.
pub(crate) fn parse_block_size(out: &[u8]) -> Result<BlockSize, NbdError> {
    let text = chomp(out);
    let bad = |why: &str| NbdError::io(format!("block_size: {why}: '{}'", text.trim()));
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|w| parse_size(w).map_err(|_| bad("cannot parse")))
        .collect::<Result<_, _>>()?;
    let [min, pref, max] = v[..] else { return Err(bad("expected three sizes")) };
    let ok = min.is_power_of_two()
        && min <= 65536
        && pref.is_power_of_two()
        && (512..=32 * 1024 * 1024).contains(&pref)
        && pref >= min
        && max >= pref
        && (max == u32::MAX as u64 || (max <= u32::MAX as u64 && max % min == 0));
    if !ok {
        return Err(bad("sizes out of range"));
    }
    Ok(BlockSize { minimum: min as u32, preferred: pref as u32, maximum: max as u32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocksmith_core::layer::Extent;

    #[test]
    fn exit_codes() {
        let r = |c| classify("m", &Exit::Code(c), b"");
        assert!(matches!(r(0), (Reply::Ok, e) if e == Effects::default()));
        assert!(matches!(r(2), (Reply::Missing, _)));
        assert!(matches!(r(3), (Reply::False, _)));
        assert!(matches!(r(1), (Reply::Err(NbdError { errno: Errno::Io, .. }), _)));
        assert!(matches!(r(42), (Reply::Err(NbdError { errno: Errno::Io, .. }), _)));
        assert!(matches!(r(4), (Reply::Ok, Effects { shutdown: true, disconnect: false })));
        assert!(matches!(
            r(5),
            (Reply::Err(NbdError { errno: Errno::Shutdown, .. }), Effects { shutdown: true, .. })
        ));
        assert!(matches!(
            r(6),
            (Reply::Err(NbdError { errno: Errno::Shutdown, .. }), Effects { disconnect: true, .. })
        ));
        assert!(matches!(r(7), (Reply::Ok, Effects { disconnect: true, shutdown: false })));
        assert!(matches!(
            r(8),
            (Reply::Err(NbdError { errno: Errno::Shutdown, .. }), Effects { disconnect: true, .. })
        ));
        let (reply, _) = classify("m", &Exit::Code(8), b"EPERM nope\n");
        assert!(matches!(reply, Reply::Err(NbdError { errno: Errno::Perm, .. })));
        let (reply, _) = classify("pread", &Exit::TimedOut(std::time::Duration::from_secs(2)), b"");
        match reply {
            Reply::Err(e) => assert!(e.message.unwrap().contains("timed out after 2s")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errno_on_stderr() {
        let e = script_error("pwrite", b"ENOSPC Out of space\nmore\n", Errno::Io);
        assert_eq!(e.errno, Errno::NoSpc);
        assert_eq!(e.message.as_deref(), Some("pwrite: Out of space"));
        assert_eq!(script_error("x", b"enospc  lower case", Errno::Io).errno, Errno::NoSpc);
        assert_eq!(script_error("x", b"EOPNOTSUPP\n", Errno::Io).errno, Errno::NotSup);
        assert_eq!(script_error("x", b"EROFS\n", Errno::Io).errno, Errno::Perm);
        // Not at the very start, or glued to more text: not an errno name.
        assert_eq!(script_error("x", b" EPERM leading", Errno::Io).errno, Errno::Io);
        assert_eq!(script_error("x", b"ENOSPCfoo", Errno::Io).errno, Errno::Io);
        let e = script_error("x", b"something broke\n", Errno::Io);
        assert_eq!((e.errno, e.message.as_deref()), (Errno::Io, Some("x: something broke")));
        assert_eq!(script_error("x", b"", Errno::Io).errno, Errno::Io);
    }

    #[test]
    fn flags() {
        assert_eq!(flags_arg(Flags::NONE), "");
        assert_eq!(flags_arg(Flags::FUA), "fua");
        assert_eq!(flags_arg(Flags::FAST_ZERO | Flags::MAY_TRIM | Flags::FUA), "fua,may_trim,fast");
        assert_eq!(flags_arg(Flags::REQ_ONE), "req_one");
    }

    #[test]
    fn outputs() {
        assert_eq!(parse_size_output("get_size", b"64M\n").unwrap(), 64 << 20);
        assert_eq!(parse_size_output("get_size", b"1048576").unwrap(), 1 << 20);
        assert!(parse_size_output("get_size", b"lots\n").is_err());
        assert_eq!(parse_support("can_fua", b"Native\n").unwrap(), Support::Native);
        assert!(parse_support("can_fua", b"sometimes").is_err());
        assert_eq!(ThreadModel::parse(b"parallel\n"), ThreadModel::Parallel);
        assert_eq!(ThreadModel::parse(b"serialize-requests"), ThreadModel::SerializeRequests);
        assert_eq!(ThreadModel::parse(b"what"), ThreadModel::SerializeAllRequests);
        assert_eq!(chomp(b"handle\n\n"), "handle\n");
        let b = parse_block_size(b"512 4K 32M\n").unwrap();
        assert_eq!((b.minimum, b.preferred, b.maximum), (512, 4096, 32 << 20));
        assert!(parse_block_size(b"3 4K 32M").is_err());
        assert!(parse_block_size(b"512 4K").is_err());
    }

    #[test]
    fn extents() {
        let e = parse_extents(b"0 1M\n1M 9M hole,zero\n", 0).unwrap();
        assert_eq!(e.0, vec![Extent { length: 1 << 20, flags: 0 }, Extent { length: 9 << 20, flags: 3 }]);
        // Clipped to the request's offset, earlier ones skipped.
        let e = parse_extents(b"0 4096 3\n4096\t4096 0\n8192 4096 1\n", 6000).unwrap();
        assert_eq!(e.0, vec![Extent { length: 2192, flags: 0 }, Extent { length: 4096, flags: 1 }]);
        assert!(parse_extents(b"4096 4096\n", 0).is_err());
        assert!(parse_extents(b"0 4096\n8192 4096\n", 0).is_err());
        assert!(parse_extents(b"", 0).is_err());
        assert!(parse_extents(b"0 x\n", 0).is_err());
    }

    #[test]
    fn export_lists() {
        let n = |v: Vec<(String, Option<String>)>| v;
        assert_eq!(
            n(parse_export_list(b"a\nb\n").unwrap()),
            vec![("a".to_string(), None), ("b".to_string(), None)]
        );
        assert_eq!(parse_export_list(b"NAMES\nx\n").unwrap(), vec![("x".to_string(), None)]);
        assert_eq!(
            parse_export_list(b"INTERLEAVED\na\nthe a\nb\nthe b\n").unwrap(),
            vec![("a".to_string(), Some("the a".to_string())), ("b".to_string(), Some("the b".to_string()))]
        );
        assert_eq!(
            parse_export_list(b"NAMES+DESCRIPTIONS\na\nb\nda\ndb").unwrap(),
            vec![("a".to_string(), Some("da".to_string())), ("b".to_string(), Some("db".to_string()))]
        );
        assert!(parse_export_list(b"INTERLEAVED\na\n").is_err());
        assert!(parse_export_list(b"").unwrap().is_empty());
    }
}
