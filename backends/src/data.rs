//! `data`: a small disk written on the command line (nbdkit-data-plugin), as `data=` in nbdkit's
//! data format, `raw=` bytes or `base64=`. The disk is a sparse RAM disk shared by every
//! connection and writable, like `memory`; writes are lost when the server exits.
//!
//! The data format is parsed into a syntax tree at configuration time (any mistake stops the
//! server, with the offset of the problem), then evaluated into a sparse store exactly as nbdkit
//! 1.32 evaluates it: `( ... )`, `$VAR`, `\NAME` and the operands of `*N` and `[N:M]` are
//! evaluated on their own, from offset 0, into a scratch store that is then copied ("blitted")
//! into place; offsets inside them are relative to their start. The size of a scope is the
//! highest offset reached in it, so `@N` alone can make a scope (or the disk) bigger.
//!
//! nbdkit's optimiser is left out except where it changes what a string means: a repeat of 0
//! and an empty slice are not evaluated at all (so they cannot fail), a slice of `<FILE` reads
//! only the slice (so `</dev/urandom[:512]` ends, and a short file is no error), and a slice
//! `[0:M]` of `<(SCRIPT)` reads only M bytes of its output — while `[:]` and `[0:]` of a script
//! give nothing, which is what nbdkit 1.32 does.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec, Support,
};
use blocksmith_core::ConfigError;

use crate::memory::MemoryDisk;
use crate::random::parse_uint;
use crate::util;

const NAME: &str = "data";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "disk contents written on the command line, in nbdkit's data format (nbdkit-data-plugin)",
    magic: Some("data"),
    params: &[
        ParamSpec {
            name: "data",
            help: "The disk in nbdkit's data format: BYTE (decimal, 0x hex, 0 octal), @OFFSET, @+N, @-N,\n\
                   @^ALIGN, \"STRING\" (C escapes), le16:/be16:/le32:/be32:/le64:/be64:WORD, ( ... ),\n\
                   EXPR*N, EXPR[N:M], EXPR -> \\NAME, \\NAME, $VAR, <FILE, <(SCRIPT), # comment.\n\
                   Exactly one of data=, raw= and base64= is required.",
        },
        ParamSpec { name: "raw", help: "The disk's bytes, verbatim." },
        ParamSpec {
            name: "base64",
            help: "The disk's bytes in base64 (white space is ignored, padding is required).",
        },
        ParamSpec {
            name: "size",
            help: "Truncate or extend (with zeroes) the disk to this size. Default: the size of the data.",
        },
        ParamSpec {
            name: "allocator",
            help: "Only 'sparse' (the default) is implemented; nbdkit's malloc and zstd are not.",
        },
        ParamSpec {
            name: "VAR",
            help: "Any other key=value defines a variable for $VAR in data= (written in the data\n\
                   format itself). Environment variables are looked up too.",
        },
    ],
    make,
};

/// The largest offset a disk can reach (nbdkit's limit, 2^63-1).
const MAX_OFFSET: u64 = i64::MAX as u64;

/// Deepest nesting of `( )`, `$VAR` and `\NAME` evaluation: far beyond real use, and well within
/// the stack of the thread that parses the command line.
const MAX_DEPTH: usize = 128;

/// Bytes copied at a time: reading files and scripts, blitting between stores.
const CHUNK: usize = 1024 * 1024;

/// A repeated operand up to this size is read once and written as long runs of copies.
const PATTERN_MAX: u64 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Syntax
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    /// A scope: `( ... )`, a `$VAR`'s contents, or the whole string.
    List(Vec<Expr>),
    Byte(u8),
    /// `@N`
    AbsOffset(u64),
    /// `@+N`, `@-N`
    RelOffset(i64),
    /// `@^N` (a power of two)
    Align(u64),
    /// `<FILE`
    File(Vec<u8>),
    /// `<(SCRIPT)`
    Script(Vec<u8>),
    /// `"STRING"`, `le32:WORD` and friends.
    Bytes(Vec<u8>),
    /// `\NAME`
    Name(String),
    /// `EXPR -> \NAME`
    Assign(String, Box<Expr>),
    /// `EXPR*N`
    Repeat(Box<Expr>, u64),
    /// `EXPR[N:M]`; no M means "to the end".
    Slice(Box<Expr>, u64, Option<u64>),
}

impl Expr {
    /// Offsets are not data: `@0*10` and the like are refused.
    fn is_data(&self) -> bool {
        !matches!(self, Expr::AbsOffset(_) | Expr::RelOffset(_) | Expr::Align(_))
    }
}

/// Where `$VAR` values come from: the backend's other parameters, then the environment.
struct Vars {
    params: Vec<(String, String)>,
}

impl Vars {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        if let Some((_, v)) = self.params.iter().find(|(k, _)| k == name) {
            return Some(v.as_bytes().to_vec());
        }
        std::env::var_os(name).map(|v| v.as_bytes().to_vec())
    }
}

/// One string being parsed: the data parameter or a variable's value.
struct Source<'a> {
    text: &'a [u8],
    /// How errors name it: `data` or `$VAR`.
    what: String,
}

impl Source<'_> {
    fn error(&self, pos: usize, reason: &str) -> String {
        let end = (pos + 20).min(self.text.len());
        let near = String::from_utf8_lossy(&self.text[pos.min(end)..end]);
        if near.is_empty() {
            format!("{} at offset {pos} (end of string): {reason}", self.what)
        } else {
            format!("{} at offset {pos} (near {:?}): {reason}", self.what, near)
        }
    }
}

/// C's isspace in the "C" locale.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What `sscanf("%i")` reads from the start of `s`: white space, an optional sign, then `0x`
/// hex, `0` octal or decimal digits. `Ok(None)` if there is no number; the count includes the
/// white space. Like glibc, a `0x` with no hex digit after it reads as 0 and consumes the `x`.
fn scan_int(s: &[u8]) -> Result<Option<(i64, usize)>, &'static str> {
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let neg = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let radix = match (s.get(i), s.get(i + 1)) {
        (Some(b'0'), Some(b'x' | b'X')) => {
            i += 2;
            16
        }
        (Some(b'0'), _) => 8,
        (Some(c), _) if c.is_ascii_digit() => 10,
        _ => return Ok(None),
    };
    let mut v: i64 = 0;
    while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(radix)) {
        v = v
            .checked_mul(i64::from(radix))
            .and_then(|v| v.checked_add(i64::from(d)))
            .ok_or("number is too large")?;
        i += 1;
    }
    Ok(Some((if neg { -v } else { v }, i)))
}

struct Parser<'v> {
    vars: &'v Vars,
}

impl Parser<'_> {
    /// Parse a whole string (the data parameter or a variable) as one scope.
    fn parse(&self, src: &Source, depth: usize) -> Result<Vec<Expr>, String> {
        let mut i = 0;
        self.list(src, &mut i, 0, depth)
    }

    /// A list of expressions up to the end of the string, or to the `)` closing level `level`.
    fn list(&self, src: &Source, i: &mut usize, level: usize, depth: usize) -> Result<Vec<Expr>, String> {
        if depth > MAX_DEPTH {
            return Err(src.error(*i, &format!("nested more than {MAX_DEPTH} deep")));
        }
        let s = src.text;
        let mut list: Vec<Expr> = Vec::new();
        // The operand of a postfix operator (`*N`, `[N:M]`, `->`): the last expression.
        let operand = |list: &mut Vec<Expr>, at: usize, op: &str| -> Result<Expr, String> {
            match list.pop() {
                None => Err(src.error(at, &format!("{op} must follow an expression"))),
                Some(e) if !e.is_data() => {
                    Err(src.error(at, &format!("{op} cannot be applied to an offset (@...)")))
                }
                Some(e) => Ok(e),
            }
        };
        // A non-negative number where `sscanf("%i")` would read one.
        let number = |at: usize, what: &str| -> Result<(u64, usize), String> {
            match scan_int(&s[at..]) {
                Ok(Some((v, n))) if v >= 0 => Ok((v as u64, n)),
                Ok(Some(_)) => Err(src.error(at, &format!("{what} must not be negative"))),
                Ok(None) => Err(src.error(at, &format!("expected a number for {what}"))),
                Err(e) => Err(src.error(at, e)),
            }
        };
        while *i < s.len() {
            let start = *i;
            match s[start] {
                b'#' => {
                    while *i < s.len() && s[*i] != b'\n' {
                        *i += 1;
                    }
                }
                b'@' => {
                    *i += 1;
                    let e = match s.get(*i) {
                        Some(b'+') => {
                            let (v, n) = number(*i + 1, "@+N")?;
                            *i += 1 + n;
                            Expr::RelOffset(v as i64)
                        }
                        Some(b'-') => {
                            let (v, n) = number(*i + 1, "@-N")?;
                            *i += 1 + n;
                            Expr::RelOffset(-(v as i64))
                        }
                        Some(b'^') => {
                            let (v, n) = number(*i + 1, "@^ALIGNMENT")?;
                            if !v.is_power_of_two() {
                                return Err(
                                    src.error(*i + 1, &format!("@^{v}: alignment must be a power of 2"))
                                );
                            }
                            *i += 1 + n;
                            Expr::Align(v)
                        }
                        Some(c) if c.is_ascii_digit() => {
                            let (v, n) = number(*i, "@OFFSET")?;
                            *i += n;
                            Expr::AbsOffset(v)
                        }
                        _ => return Err(src.error(start, "expected @OFFSET, @+N, @-N or @^ALIGNMENT")),
                    };
                    list.push(e);
                }
                b'(' => {
                    *i += 1;
                    let inner = self.list(src, i, level + 1, depth + 1)?;
                    list.push(Expr::List(inner));
                }
                b')' => {
                    if level == 0 {
                        return Err(src.error(start, "unmatched ')'"));
                    }
                    *i += 1;
                    return Ok(list);
                }
                b'*' => {
                    let e = operand(&mut list, start, "*N")?;
                    let (n, len) = number(start + 1, "*N")?;
                    *i = start + 1 + len;
                    list.push(Expr::Repeat(Box::new(e), n));
                }
                b'[' => {
                    let e = operand(&mut list, start, "[N:M]")?;
                    let (n, m, len) = slice(&s[start + 1..]).map_err(|why| src.error(start, why))?;
                    *i = start + 1 + len;
                    list.push(Expr::Slice(Box::new(e), n, m));
                }
                b'<' if s.get(start + 1) == Some(&b'(') => {
                    // The script runs to the `)` matching `<(`; parentheses inside must pair up.
                    let body = start + 2;
                    let mut lvl = 0usize;
                    let mut j = body;
                    while j < s.len() {
                        match s[j] {
                            b'(' => lvl += 1,
                            b')' if lvl == 0 => break,
                            b')' => lvl -= 1,
                            _ => {}
                        }
                        j += 1;
                    }
                    if j >= s.len() {
                        return Err(src.error(start, "<(SCRIPT) has no closing ')'"));
                    }
                    if j == body {
                        return Err(src.error(start, "<(SCRIPT) is empty"));
                    }
                    list.push(Expr::Script(s[body..j].to_vec()));
                    *i = j + 1;
                }
                b'<' => {
                    let name = start + 1;
                    let len =
                        s[name..].iter().position(|c| b"*[) \t\n".contains(c)).unwrap_or(s.len() - name);
                    if len == 0 {
                        return Err(src.error(start, "<FILE: expected a file name"));
                    }
                    list.push(Expr::File(s[name..name + len].to_vec()));
                    *i = name + len;
                }
                b'"' => {
                    *i += 1;
                    list.push(Expr::Bytes(string(src, i)?));
                }
                b'\\' => {
                    let len = name_len(&s[start + 1..]);
                    if len == 0 {
                        return Err(src.error(start, "expected a \\NAME (letters, digits, '-' and '_')"));
                    }
                    list.push(Expr::Name(lossy(&s[start + 1..start + 1 + len])));
                    *i = start + 1 + len;
                }
                b'-' => {
                    if s.get(start + 1) != Some(&b'>') {
                        return Err(src.error(start, "expected '->'"));
                    }
                    let e = operand(&mut list, start, "->")?;
                    let mut j = start + 2;
                    while j < s.len() && is_space(s[j]) {
                        j += 1;
                    }
                    let len = if s.get(j) == Some(&b'\\') { name_len(&s[j + 1..]) } else { 0 };
                    if len == 0 {
                        return Err(src.error(j, "'->' must be followed by a \\NAME"));
                    }
                    list.push(Expr::Assign(lossy(&s[j + 1..j + 1 + len]), Box::new(e)));
                    *i = j + 1 + len;
                }
                b'$' => {
                    let name = start + 1;
                    let ok = s.get(name).is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_');
                    let len = if ok {
                        s[name..].iter().take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_').count()
                    } else {
                        0
                    };
                    if len == 0 {
                        return Err(
                            src.error(start, "expected $VAR (a letter or '_', then letters, digits, '_')")
                        );
                    }
                    let var = lossy(&s[name..name + len]);
                    let value = self
                        .vars
                        .get(&var)
                        .ok_or_else(|| src.error(start, &format!("${var}: variable not found")))?;
                    let inner = Source { text: &value, what: format!("${var}") };
                    list.push(Expr::List(self.parse(&inner, depth + 1)?));
                    *i = name + len;
                }
                b'0'..=b'9' => {
                    let (v, n) = number(start, "BYTE")?;
                    let b =
                        u8::try_from(v).map_err(|_| src.error(start, "BYTE must be in the range 0..255"))?;
                    list.push(Expr::Byte(b));
                    *i += n;
                }
                b'l' | b'b' => {
                    list.push(Expr::Bytes(word(src, i)?));
                }
                c if is_space(c) => *i += 1,
                _ => return Err(src.error(start, "unexpected character")),
            }
        }
        if level > 0 {
            return Err(src.error(*i, "unmatched '('"));
        }
        Ok(list)
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Length of a `\NAME` (without the backslash): letters, digits, `-`, `_`.
fn name_len(s: &[u8]) -> usize {
    s.iter().take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-').count()
}

/// The inside of `[N:M]` (after the `[`), in the four forms nbdkit reads: `N:M]`, `:M]`, `N:]`
/// and `:]`. Returns N, M and the length consumed including the `]`.
fn slice(s: &[u8]) -> Result<(u64, Option<u64>, usize), &'static str> {
    let num = |at: usize| -> Result<Option<(u64, usize)>, &'static str> {
        match scan_int(s.get(at..).unwrap_or_default())? {
            Some((v, n)) if v >= 0 => Ok(Some((v as u64, n))),
            Some(_) => Err("[N:M] must not be negative"),
            None => Ok(None),
        }
    };
    let at = |i: usize, c: u8| s.get(i) == Some(&c);
    if let Some((n, a)) = num(0)? {
        if at(a, b':') {
            if let Some((m, b)) = num(a + 1)? {
                if at(a + 1 + b, b']') {
                    return Ok((n, Some(m), a + b + 2));
                }
            } else if at(a + 1, b']') {
                return Ok((n, None, a + 2));
            }
        }
    } else if at(0, b':') {
        if let Some((m, b)) = num(1)? {
            if at(1 + b, b']') {
                return Ok((0, Some(m), b + 2));
            }
        } else if at(1, b']') {
            return Ok((0, None, 2));
        }
    }
    Err("expected [N:M], [:M], [N:] or [:] with numbers")
}

/// A `"STRING"` with C escapes; `*i` is just past the opening quote.
fn string(src: &Source, i: &mut usize) -> Result<Vec<u8>, String> {
    let s = src.text;
    let open = *i - 1;
    let mut out = Vec::new();
    while *i < s.len() {
        let c = s[*i];
        *i += 1;
        match c {
            b'"' => return Ok(out),
            b'\\' => {
                let Some(&e) = s.get(*i) else { break };
                *i += 1;
                out.push(match e {
                    b'a' => 7,
                    b'b' => 8,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'v' => 0x0b,
                    b'x' => {
                        let hex = |at: usize| s.get(at).and_then(|&c| (c as char).to_digit(16));
                        match (hex(*i), hex(*i + 1)) {
                            (Some(h), Some(l)) => {
                                *i += 2;
                                (h * 16 + l) as u8
                            }
                            _ => {
                                return Err(src.error(
                                    *i - 2,
                                    "\\xNN must be followed by exactly two hexadecimal characters",
                                ))
                            }
                        }
                    }
                    b'0'..=b'9' | b'u' => {
                        return Err(src.error(
                            *i - 2,
                            "numeric (\\NNN) and unicode (\\u) escapes are not implemented (nor in nbdkit)",
                        ))
                    }
                    // \\, \" and anything else stand for themselves.
                    other => other,
                });
            }
            other => out.push(other),
        }
    }
    Err(src.error(open, "unterminated string"))
}

/// `le16:WORD` ... `be64:WORD`: the token runs to the next white space.
fn word(src: &Source, i: &mut usize) -> Result<Vec<u8>, String> {
    let s = src.text;
    let start = *i;
    let len = s[start..].iter().position(|&c| is_space(c)).unwrap_or(s.len() - start);
    let tok = &s[start..start + len];
    *i = start + len;
    let (little, bytes) = match tok.get(..5) {
        Some(b"le16:") => (true, 2),
        Some(b"le32:") => (true, 4),
        Some(b"le64:") => (true, 8),
        Some(b"be16:") => (false, 2),
        Some(b"be32:") => (false, 4),
        Some(b"be64:") => (false, 8),
        _ => return Err(src.error(start, "expected le16:, le32:, le64:, be16:, be32: or be64:")),
    };
    let max = if bytes == 8 { u64::MAX } else { (1u64 << (bytes * 8)) - 1 };
    let text = String::from_utf8_lossy(&tok[5..]);
    let v = parse_uint("word", &text, max).map_err(|e| src.error(start + 5, &e.0))?;
    let all = if little { v.to_le_bytes() } else { v.to_be_bytes() };
    Ok(if little { all[..bytes].to_vec() } else { all[8 - bytes..].to_vec() })
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// Names in scope: each `-> \NAME` adds one in front of the scope it appears in.
type Dict<'a> = Option<Rc<Binding<'a>>>;

struct Binding<'a> {
    name: &'a str,
    expr: &'a Expr,
    next: Dict<'a>,
}

/// The expressions of a scope: a list's elements, or a lone expression as a list of one.
fn items(e: &Expr) -> &[Expr] {
    match e {
        Expr::List(v) => v,
        other => std::slice::from_ref(other),
    }
}

/// What nbdkit's optimiser reduces an operand to before it looks for `<FILE[N:M]` and
/// `<(SCRIPT)[:M]`: a scope holding just one such expression, or one repeated once.
fn unwrap_operand(mut e: &Expr) -> &Expr {
    loop {
        e = match e {
            Expr::List(v) if v.len() == 1 && inlinable(&v[0]) => &v[0],
            Expr::Repeat(x, 1) => x,
            _ => return e,
        }
    }
}

/// Expressions whose meaning does not depend on the scope they are in.
fn inlinable(e: &Expr) -> bool {
    e.is_data() && !matches!(e, Expr::Assign(..) | Expr::Name(_))
}

fn too_big() -> String {
    format!("{NAME}: the data would extend beyond the largest disk size (2^63-1 bytes)")
}

/// `offset + len`, if the result is still a valid disk offset.
fn advance(offset: u64, len: u64) -> Result<u64, String> {
    offset.checked_add(len).filter(|&e| e <= MAX_OFFSET).ok_or_else(too_big)
}

fn store_write(out: &MemoryDisk, data: &[u8], offset: u64) -> Result<u64, String> {
    let end = advance(offset, data.len() as u64)?;
    out.write(data, offset).map_err(|e| format!("{NAME}: {e}"))?;
    Ok(end)
}

/// Copy `len` bytes at `src_off` of `src` to `dst_off` of `dst`; holes in `src` zero `dst`.
fn blit(src: &MemoryDisk, src_off: u64, len: u64, dst: &MemoryDisk, dst_off: u64) -> Result<(), String> {
    advance(dst_off, len)?;
    let mut done = 0u64;
    let mut buf = Vec::new();
    while done < len {
        let e = src.extents(len - done, src_off + done);
        if e.total() == 0 {
            return Err(format!("{NAME}: internal error: empty extents while copying"));
        }
        for x in e.0 {
            let n = x.length.min(len - done);
            if x.flags & blocksmith_core::layer::EXTENT_HOLE != 0 {
                dst.zero(n, dst_off + done);
            } else {
                let mut k = 0;
                while k < n {
                    let c = (n - k).min(CHUNK as u64) as usize;
                    buf.resize(c, 0);
                    src.read(&mut buf, src_off + done + k);
                    store_write(dst, &buf, dst_off + done + k)?;
                    k += c as u64;
                }
            }
            done += n;
        }
    }
    Ok(())
}

/// Copy everything `reader` yields (up to `limit` bytes) to `out` from `offset`.
fn store_stream(
    reader: &mut dyn Read,
    limit: Option<u64>,
    out: &MemoryDisk,
    offset: &mut u64,
    what: &str,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    let mut left = limit;
    loop {
        let want = left.map_or(CHUNK, |l| l.min(CHUNK as u64) as usize);
        if want == 0 {
            return Ok(());
        }
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("{NAME}: {what}: {e}")),
        };
        *offset = store_write(out, &buf[..n], *offset)?;
        if let Some(l) = left.as_mut() {
            *l -= n as u64;
        }
    }
}

/// `<FILE`, or `<FILE[skip:end]`: a file shorter than the slice is not an error, as in nbdkit.
fn store_file(
    path: &[u8],
    skip: u64,
    end: Option<u64>,
    out: &MemoryDisk,
    offset: &mut u64,
) -> Result<(), String> {
    let name = String::from_utf8_lossy(path);
    if end.is_some_and(|m| skip > m) {
        return Err(format!("{NAME}: <{name}[{skip}:{}] does not describe a valid slice", end.unwrap_or(0)));
    }
    let mut f = File::open(OsStr::from_bytes(path)).map_err(|e| format!("{NAME}: <{name}: {e}"))?;
    if skip > 0 {
        f.seek(SeekFrom::Start(skip)).map_err(|e| format!("{NAME}: <{name}: seek: {e}"))?;
    }
    store_stream(&mut f, end.map(|m| m - skip), out, offset, &format!("<{name}"))
}

/// `<(SCRIPT)`: run it with /bin/sh, its output is the data (at most `limit` bytes). Its exit
/// status is ignored, as nbdkit (which uses popen) ignores it.
fn store_script(script: &[u8], limit: Option<u64>, out: &MemoryDisk, offset: &mut u64) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(OsStr::from_bytes(script))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{NAME}: <(SCRIPT): cannot run /bin/sh: {e}"))?;
    let r = match child.stdout.take() {
        Some(mut pipe) => store_stream(&mut pipe, limit, out, offset, "<(SCRIPT)"),
        None => Err(format!("{NAME}: <(SCRIPT): no output pipe")),
        // Dropping the pipe here lets a script that would write forever die of SIGPIPE.
    };
    let status = child.wait().map_err(|e| format!("{NAME}: <(SCRIPT): {e}"))?;
    if !status.success() {
        log::debug!("{NAME}: <(SCRIPT) exited with {status} (ignored, as by nbdkit)");
    }
    r
}

/// The evaluator. The `depth` its methods carry bounds recursion through scopes and names.
struct Eval;

impl Eval {
    /// Evaluate `e` as a scope of its own from offset 0 into a fresh store: its size and store.
    fn sub<'a>(&self, e: &'a Expr, dict: &Dict<'a>, depth: usize) -> Result<(MemoryDisk, u64), String> {
        let store = MemoryDisk::new(MAX_OFFSET);
        let (mut offset, mut size) = (0, 0);
        self.scope(items(e), dict.clone(), &store, &mut offset, &mut size, depth + 1)?;
        Ok((store, size))
    }

    fn scope<'a>(
        &self,
        list: &'a [Expr],
        mut dict: Dict<'a>,
        out: &MemoryDisk,
        offset: &mut u64,
        size: &mut u64,
        depth: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("{NAME}: expressions nested more than {MAX_DEPTH} deep"));
        }
        for e in list {
            match e {
                Expr::Byte(b) => *offset = store_write(out, &[*b], *offset)?,
                Expr::Bytes(v) => *offset = store_write(out, v, *offset)?,
                Expr::AbsOffset(n) => *offset = advance(*n, 0)?,
                Expr::RelOffset(n) if *n < 0 => {
                    let back = n.unsigned_abs();
                    if back > *offset {
                        return Err(format!(
                            "{NAME}: @-{back} must not be larger than the current offset {}",
                            *offset
                        ));
                    }
                    *offset -= back;
                }
                Expr::RelOffset(n) => *offset = advance(*offset, n.unsigned_abs())?,
                Expr::Align(a) => {
                    let r = *offset % a;
                    if r != 0 {
                        *offset = advance(*offset, a - r)?;
                    }
                }
                Expr::File(path) => store_file(path, 0, None, out, offset)?,
                Expr::Script(script) => store_script(script, None, out, offset)?,
                Expr::Assign(name, inner) => {
                    dict = Some(Rc::new(Binding { name: name.as_str(), expr: inner.as_ref(), next: dict }));
                }
                Expr::Name(name) => {
                    let mut t = dict.as_ref();
                    while let Some(b) = t {
                        if b.name == name {
                            break;
                        }
                        t = b.next.as_ref();
                    }
                    let b = t.ok_or_else(|| format!("{NAME}: \\{name} is not defined"))?;
                    // Evaluated in the scope where it was named (not including itself), as
                    // nbdkit does: a name cannot refer to itself.
                    let (store, n) = self.sub(b.expr, &b.next, depth)?;
                    blit(&store, 0, n, out, *offset)?;
                    *offset = advance(*offset, n)?;
                }
                Expr::List(_) => {
                    let (store, n) = self.sub(e, &dict, depth)?;
                    blit(&store, 0, n, out, *offset)?;
                    *offset = advance(*offset, n)?;
                }
                Expr::Repeat(_, 0) => {}
                Expr::Repeat(inner, count) => {
                    let (store, n) = self.sub(inner, &dict, depth)?;
                    repeat(&store, n, *count, out, *offset)?;
                    *offset = advance(*offset, n.checked_mul(*count).ok_or_else(too_big)?)?;
                }
                Expr::Slice(_, n, Some(m)) if n == m => {}
                Expr::Slice(inner, n, m) => match (unwrap_operand(inner), *n, *m) {
                    (Expr::File(path), n, m) => store_file(path, n, m, out, offset)?,
                    (Expr::Script(script), 0, m) => {
                        // nbdkit reads M bytes of output for [:M]; with no M it reads none.
                        store_script(script, Some(m.unwrap_or(0)), out, offset)?
                    }
                    (_, n, m) => {
                        let (store, len) = self.sub(inner, &dict, depth)?;
                        let m = m.unwrap_or(len);
                        if n > len || m > len || n > m {
                            return Err(format!(
                                "{NAME}: [{n}:{m}] does not describe a valid slice of {len} bytes"
                            ));
                        }
                        blit(&store, n, m - n, out, *offset)?;
                        *offset = advance(*offset, m - n)?;
                    }
                },
            }
            *size = (*size).max(*offset);
        }
        Ok(())
    }
}

/// Write `count` copies of the first `len` bytes of `src` at `offset` of `out`.
fn repeat(src: &MemoryDisk, len: u64, count: u64, out: &MemoryDisk, offset: u64) -> Result<(), String> {
    let total = len.checked_mul(count).ok_or_else(too_big)?;
    advance(offset, total)?;
    if len == 0 {
        return Ok(());
    }
    let e = src.extents(len, 0);
    if e.0.len() == 1 && e.0[0].length >= len && e.0[0].flags & blocksmith_core::layer::EXTENT_HOLE != 0 {
        // Nothing but a hole (`( @1M )*N`): one zeroing, however many copies.
        out.zero(total, offset);
        return Ok(());
    }
    if len > PATTERN_MAX {
        for k in 0..count {
            blit(src, 0, len, out, offset + k * len)?;
        }
        return Ok(());
    }
    // Small operand (the usual `( 0x55 0xAA )*2048`): read it once and write long runs of it.
    let mut pat = vec![0u8; len as usize];
    src.read(&mut pat, 0);
    if util::is_zero(&pat) {
        out.zero(total, offset);
        return Ok(());
    }
    let per_chunk = (CHUNK as u64 / len).max(1).min(count);
    let chunk = pat.repeat(per_chunk as usize);
    let mut k = 0;
    while k < count {
        let n = (count - k).min(per_chunk);
        store_write(out, &chunk[..(n * len) as usize], offset + k * len)?;
        k += n;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// base64
// ---------------------------------------------------------------------------------------------

/// Decode standard base64 with padding; white space anywhere is ignored (as GnuTLS, which
/// nbdkit uses, ignores line breaks and blanks).
pub(crate) fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let chars: Vec<u8> = s.bytes().filter(|&c| !is_space(c)).collect();
    let (quads, rest) = (chars.len() / 4, chars.len() % 4);
    if rest > 0 {
        return Err(format!("invalid base64: {} characters is not a multiple of 4", chars.len()));
    }
    let mut out = Vec::with_capacity(quads * 3);
    for (q, quad) in chars.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return Err(format!("invalid base64: misplaced '=' in characters {}..{}", q * 4, q * 4 + 4));
        }
        let mut v = 0u32;
        for (k, &c) in quad[..4 - pad].iter().enumerate() {
            let d = val(c)
                .ok_or_else(|| format!("invalid base64: bad character {:?} at {}", c as char, q * 4 + k))?;
            v |= d << (18 - 6 * k);
        }
        let b = v.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------------------------

/// Build the disk from `data` in the data format; returns the store and the data's size.
fn evaluate(data: &str, vars: &Vars) -> Result<(MemoryDisk, u64), String> {
    let parser = Parser { vars };
    let src = Source { text: data.as_bytes(), what: NAME.to_string() };
    let list = parser.parse(&src, 0)?;
    let store = MemoryDisk::new(MAX_OFFSET);
    let (mut offset, mut size) = (0, 0);
    Eval.scope(&list, None, &store, &mut offset, &mut size, 0)?;
    Ok((store, size))
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let err = |m: String| ConfigError::new(format!("{NAME}: {m}"));
    let size = util::take_size(params, NAME)?;
    if let Some(a) = params.take("allocator") {
        // nbdkit's allocator=malloc,mlock=true form has options after a comma.
        if a.split(',').next().map(str::trim) != Some("sparse") {
            return Err(err(format!(
                "allocator '{a}' is not supported (only allocator=sparse is implemented)"
            )));
        }
    }
    let mut given: Vec<(&str, String)> = Vec::new();
    for key in ["data", "raw", "base64"] {
        given.extend(params.take_all(key).into_iter().map(|v| (key, v)));
    }
    // Everything else names a $VAR (nbdkit uses the first value given for a key).
    let keys: Vec<String> = params.keys().map(str::to_string).collect();
    let mut vars = Vars { params: Vec::new() };
    for k in keys {
        if let Some(v) = params.take_all(&k).into_iter().next() {
            vars.params.push((k, v));
        }
    }
    let (kind, value) = match given.len() {
        1 => given.remove(0),
        0 => return Err(err("one of data=, raw= or base64= is required".into())),
        _ => return Err(err("exactly one of data=, raw= or base64= may be given, once".into())),
    };
    if kind != "data" {
        if let Some((k, _)) = vars.params.first() {
            return Err(err(format!(
                "unknown parameter '{k}' (other parameters are $VARs, which only data= can use)"
            )));
        }
    }
    params.finish(NAME)?;
    let (store, data_size) = match kind {
        "raw" => {
            let store = MemoryDisk::new(MAX_OFFSET);
            store_write(&store, value.as_bytes(), 0).map_err(ConfigError::new)?;
            (store, value.len() as u64)
        }
        "base64" => {
            let bytes = decode_base64(&value).map_err(|e| err(format!("base64: {e}")))?;
            let store = MemoryDisk::new(MAX_OFFSET);
            store_write(&store, &bytes, 0).map_err(ConfigError::new)?;
            (store, bytes.len() as u64)
        }
        _ => evaluate(&value, &vars).map_err(ConfigError::new)?,
    };
    let size = size.unwrap_or(data_size);
    if size < data_size {
        // Truncated: drop what lies beyond, so nothing out of sight holds memory.
        store.zero(MAX_OFFSET - size, size);
    }
    log::debug!("{NAME}: data size {data_size}, disk size {size}");
    Ok(Arc::new(DataFactory { disk: Arc::new(store), size }))
}

struct DataFactory {
    disk: Arc<MemoryDisk>,
    size: u64,
}

impl BackendFactory for DataFactory {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(DataLayer { disk: self.disk.clone(), size: self.size }))
    }
}

/// One connection's view of the shared store (the memory backend's semantics with a size of
/// the data's choosing).
struct DataLayer {
    disk: Arc<MemoryDisk>,
    size: u64,
}

impl Layer for DataLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            can_write: true,
            can_flush: true,
            fua: Support::Native,
            can_trim: true,
            zero: Support::Native,
            can_fast_zero: true,
            can_extents: true,
            cache: Support::Native,
            can_multi_conn: true,
            ..ExportInfo::read_only(self.size)
        }
    }

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        self.disk.read(&mut buf, offset);
        done.ok(buf)
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        done.call(self.disk.write(&data, offset))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        done.ok(())
    }

    fn trim(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        self.disk.zero(count, offset);
        done.ok(())
    }

    fn zero(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        self.disk.zero(count, offset);
        done.ok(())
    }

    fn extents(&self, count: u64, offset: u64, _flags: Flags, done: Done<Extents>) {
        done.ok(self.disk.extents(count, offset))
    }

    fn cache(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};
    use blocksmith_core::layer::{EXTENT_HOLE, EXTENT_ZERO};

    /// The disk `data` describes, with `vars` as extra parameters.
    fn eval_with(data: &str, vars: &[(&str, &str)]) -> Result<Vec<u8>, String> {
        let vars = Vars { params: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        let (store, size) = evaluate(data, &vars)?;
        let mut buf = vec![0xa5; size as usize];
        store.read(&mut buf, 0);
        Ok(buf)
    }

    fn eval(data: &str) -> Vec<u8> {
        eval_with(data, &[]).unwrap_or_else(|e| panic!("{data:?}: {e}"))
    }

    fn eval_err(data: &str) -> String {
        match eval_with(data, &[]) {
            Ok(v) => panic!("{data:?} was accepted: {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn bytes_and_offsets() {
        assert_eq!(eval("0 1 2 3"), [0, 1, 2, 3]);
        assert_eq!(eval("0x10 010 255 0XfF"), [16, 8, 255, 255]);
        // sscanf("%i") reads "08" as 0 then 8, and "0x" as 0.
        assert_eq!(eval("08"), [0, 8]);
        assert_eq!(eval("0x"), [0]);
        let d = eval("0 1 2 3 @0x1fe 0x55 0xaa");
        assert_eq!(d.len(), 512);
        assert_eq!(&d[..4], &[0, 1, 2, 3]);
        assert!(d[4..510].iter().all(|&b| b == 0));
        assert_eq!(&d[510..], &[0x55, 0xaa]);
        assert_eq!(eval("0 1 2 3 @^0x200 @-2 le16:0xaa55"), d);
        // An offset alone makes the disk bigger; alignment too.
        assert_eq!(eval("1 @5"), [1, 0, 0, 0, 0]);
        assert_eq!(eval("@5"), [0; 5]);
        assert_eq!(eval("@^8 1"), [1]);
        assert_eq!(eval("1 @^8"), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(eval("1 2 3 @+2 4 @-4 5"), [1, 2, 5, 0, 0, 4]);
        // Later bytes overwrite earlier ones.
        assert_eq!(eval("1 2 3 @1 9"), [1, 9, 3]);
        assert_eq!(eval("# comment 1 2\n 7 # more"), [7]);
        assert_eq!(eval(""), Vec::<u8>::new());
    }

    #[test]
    fn strings_and_words() {
        assert_eq!(eval(r#""Hello" " " "\x41\n\t\"\\\q""#), b"Hello A\n\t\"\\q");
        assert_eq!(eval("be32:0x1"), [0, 0, 0, 1]);
        assert_eq!(eval("le32:0x01020304 be16:258 le64:1"), [4, 3, 2, 1, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(eval("be64:0xffffffffffffffff"), [0xff; 8]);
        assert_eq!(eval("le16:0 be16:0x10"), [0, 0, 0, 16]);
    }

    #[test]
    fn groups_repeats_slices() {
        assert_eq!(eval("1 * 3"), [1, 1, 1]);
        assert_eq!(eval("( 1 2 ) * 2"), [1, 2, 1, 2]);
        assert_eq!(eval(r#" "ab" [1:] "#), b"b");
        assert_eq!(eval(r#""abc"[1:2]"#), b"b");
        assert_eq!(eval(r#""abcdef"[:2] "abcdef"[4:] "abcdef"[:] "xy"[1:1]"#), b"abefabcdef");
        // Offsets inside a group are relative to it, and its size is its highest offset.
        assert_eq!(eval("9 9 ( @2 1 ) 7"), [9, 9, 0, 0, 1, 7]);
        assert_eq!(eval("( @3 )*2 1"), [0, 0, 0, 0, 0, 0, 1]);
        // A group's holes overwrite what was there.
        assert_eq!(eval(r#""XXXX" @0 ( @3 1 )"#), [0, 0, 0, 1]);
        let d = eval("( 0x55 0xAA )*2048");
        assert_eq!(d.len(), 4096);
        assert!(d.chunks(2).all(|c| c == [0x55, 0xaa]));
        // Large repeats of small and large operands.
        let d = eval(r#"( "abc" @+65536 )*40 "z""#);
        assert_eq!(d.len(), 40 * 65539 + 1);
        assert_eq!(&d[65539..65542], b"abc");
        assert_eq!(&d[39 * 65539..39 * 65539 + 3], b"abc");
        assert_eq!(d[40 * 65539], b'z');
        let d = eval("( 1 2 3 )*1000000");
        assert_eq!(d.len(), 3_000_000);
        assert_eq!(&d[2_999_997..], &[1, 2, 3]);
        assert_eq!(eval("( 0 )*10 @0 1"), [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // Zero repeats and empty slices are not evaluated at all (as nbdkit's optimiser).
        assert_eq!(eval("( \\undefined )*0 ( <does-not-exist )[3:3] 5"), [5]);
        assert_eq!(eval("( 1 2 3 4 )[1:3]*2"), [2, 3, 2, 3]);
        // A huge repeat of nothing but a hole costs one zeroing.
        let (store, size) = evaluate("( @1048576 )*1000000000 1", &Vars { params: vec![] }).unwrap();
        assert_eq!(size, (1 << 20) * 1_000_000_000 + 1);
        let mut last = [9u8; 2];
        store.read(&mut last, size - 2);
        assert_eq!(last, [0, 1]);
    }

    #[test]
    fn names_and_variables() {
        let d =
            eval(r" ( 0x55 0xAA ) -> \boot-signature ( @0x1fe \boot-signature ) -> \sector \sector \sector ");
        assert_eq!(d.len(), 1024);
        assert_eq!(&d[510..512], &[0x55, 0xaa]);
        assert_eq!(&d[1022..], &[0x55, 0xaa]);
        // A name is evaluated where it was defined, and goes out of scope with its group.
        assert_eq!(eval(r"1 -> \a ( 2 -> \a \a ) \a"), [2, 1]);
        assert!(eval_err(r"( 1 -> \a ) \a").contains("\\a is not defined"));
        assert!(eval_err(r"1 -> \a 2 -> \b \b -> \a \a \c").contains("\\c is not defined"));
        assert_eq!(
            eval_with("$pattern*3 $x", &[("pattern", "0x55 0xAA"), ("x", "( 7 )")]).unwrap(),
            [0x55, 0xaa, 0x55, 0xaa, 0x55, 0xaa, 7]
        );
        // Variables are scopes of their own: an offset in one is relative.
        assert_eq!(eval_with("1 $v 2", &[("v", "@2 9")]).unwrap(), [1, 0, 0, 9, 2]);
        std::env::set_var("BLOCKSMITH_DATA_TEST_VAR", "42 43");
        assert_eq!(eval("$BLOCKSMITH_DATA_TEST_VAR"), [42, 43]);
        assert!(eval_err("$nope_not_set").contains("$nope_not_set: variable not found"));
        // A variable that refers to itself is stopped, not a stack overflow.
        assert!(eval_with("$a", &[("a", "1 $a")]).unwrap_err().contains("deep"));
    }

    #[test]
    fn files_and_scripts() {
        let dir = std::env::temp_dir().join(format!("bs-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f.bin");
        std::fs::write(&f, b"0123456789").unwrap();
        let p = f.to_str().unwrap();
        assert_eq!(
            eval(&format!("<{p} @^16 <{p}[2:5] <{p}[8:] <{p}[:1]*2")),
            [&b"0123456789"[..], &[0; 6], b"234", b"89", b"00"].concat()
        );
        // A slice of a file past its end reads what there is (nbdkit does not check).
        assert_eq!(eval(&format!("( <{p} )[5:100]")), b"56789");
        assert_eq!(eval("</dev/zero[:3] 1 </dev/urandom[:512]").len(), 516);
        assert!(eval_err(&format!("<{p}[5:2]")).contains("valid slice"));
        assert!(eval_err("</nonexistent/file").contains("/nonexistent/file"));
        assert_eq!(eval("<(echo hello)[:3]"), b"hel");
        assert_eq!(eval("<( printf 'a(b)c' )"), b"a(b)c");
        assert_eq!(eval("<(echo hi)[1:]"), b"i\n");
        // nbdkit 1.32 reads nothing for [:] and [0:] of a script.
        assert_eq!(eval("<(echo hi)[:] <(echo hi)[0:] 1"), [1]);
        // An endless script is cut off by [:N].
        assert_eq!(eval("<(yes)[:6]"), b"y\ny\ny\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parse_errors_say_where() {
        for (data, want) in [
            ("0xg", "offset 2"),
            ("1 @+-2", "must not be negative"),
            ("le16:0x10000", "out of range"),
            ("le16:-1", "negative"),
            ("be32:  5", "empty"),
            ("lx16:1", "expected le16:"),
            (r#""\x4""#, "two hexadecimal"),
            (r#""\101""#, "not implemented"),
            (r#""abc"#, "unterminated string"),
            ("256", "0..255"),
            ("( 1", "unmatched '('"),
            ("1 )", "unmatched ')'"),
            ("*2", "must follow an expression"),
            ("@0 *2", "offset"),
            ("1 *x", "expected a number for *N"),
            ("1 [1", "[N:M]"),
            ("1 [-1:]", "negative"),
            ("1 -> a", "\\NAME"),
            ("1 - 2", "'->'"),
            ("@^3", "power of 2"),
            ("@x", "expected @OFFSET"),
            ("$ 1", "expected $VAR"),
            ("<", "file name"),
            ("<(echo", "closing ')'"),
            ("<()", "empty"),
            ("!", "unexpected character"),
            ("(1 2 3)[1:5]", "valid slice"),
            ("1 @-2", "larger than the current offset"),
            ("@9223372036854775807 1", "2^63-1"),
            ("@99999999999999999999", "too large"),
        ] {
            let e = eval_err(data);
            assert!(e.contains(want), "{data:?}: {e}");
        }
        assert!(eval_err("1 2 !").contains("data at offset 4 (near \"!\")"));
    }

    #[test]
    fn base64() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs\nbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbA==").unwrap(), b"hell");
        assert_eq!(decode_base64("").unwrap(), b"");
        for bad in ["aGVsbG8", "aGVsbA=", "aGVsbG8=x", "aG=sbG8=", "aGVs*G8="] {
            assert!(decode_base64(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backend_parameters_and_serving() {
        let c = open(make(&SPEC, &[("data", r#"( "Hello" )*2000"#), ("size", "8192")]).unwrap(), false);
        assert_eq!(c.info().size, 8192);
        assert_eq!(c.read(7, 8185).unwrap(), b"HelloHe");
        let c = open(make(&SPEC, &[("raw", "hello"), ("size", "1M")]).unwrap(), false);
        assert_eq!(c.info().size, 1 << 20);
        assert_eq!(c.read(6, 0).unwrap(), b"hello\0");
        let c = open(make(&SPEC, &[("base64", "MTIz")]).unwrap(), false);
        assert_eq!(c.read(3, 0).unwrap(), b"123");
        assert_eq!(c.info().size, 3);
        // Truncation hides (and frees) what is past the end.
        let c = open(make(&SPEC, &[("data", "1 2 3"), ("size", "2")]).unwrap(), false);
        assert_eq!(c.info().size, 2);
        assert_eq!(c.read(2, 0).unwrap(), [1, 2]);
        // Writable, sparse, and shared like memory.
        let f = make(&SPEC, &[("data", "@1048576 1")]).unwrap();
        let a = open(f.clone(), false);
        let b = open(f, false);
        let i = a.info();
        assert!(
            i.can_write && i.can_trim && i.can_flush && i.can_extents && i.can_multi_conn && i.can_fast_zero
        );
        a.write(b"xyz", 10, Flags::FUA).unwrap();
        assert_eq!(b.read(3, 10).unwrap(), b"xyz");
        let hz = EXTENT_HOLE | EXTENT_ZERO;
        let e = b.extents((1 << 20) + 1, 0, Flags::NONE).unwrap();
        assert_eq!(e.first(), Some(&(32768, 0)));
        assert_eq!(e.last(), Some(&(1, 0)));
        assert_eq!(e[1].1, hz);
        b.zero(3, 10, Flags::NONE).unwrap();
        b.trim(1, 1 << 20, Flags::NONE).unwrap();
        assert_eq!(a.extents((1 << 20) + 1, 0, Flags::NONE).unwrap(), vec![((1 << 20) + 1, hz)]);
        a.flush().unwrap();
        a.cache(100, 0).unwrap();
        // $VARs come from the other parameters.
        let c = open(make(&SPEC, &[("data", "$x $x"), ("x", "7"), ("x", "8")]).unwrap(), false);
        assert_eq!(c.read(2, 0).unwrap(), [7, 7]);
        // Mistakes.
        assert!(make_err(&SPEC, &[]).contains("one of data=, raw= or base64="));
        assert!(make_err(&SPEC, &[("data", "1"), ("raw", "x")]).contains("exactly one"));
        assert!(make_err(&SPEC, &[("data", "1"), ("data", "2")]).contains("exactly one"));
        assert!(make_err(&SPEC, &[("raw", "1"), ("x", "2")]).contains("unknown parameter 'x'"));
        assert!(make_err(&SPEC, &[("data", "1"), ("allocator", "malloc")]).contains("malloc"));
        assert!(make(&SPEC, &[("data", "1"), ("allocator", "sparse")]).is_ok());
        assert!(make_err(&SPEC, &[("base64", "!!!!")]).contains("base64"));
        assert!(make_err(&SPEC, &[("data", "1 )")]).starts_with("data at offset 2"));
        assert!(make_err(&SPEC, &[("data", "1"), ("size", "x")]).starts_with("data: size:"));
    }
}
