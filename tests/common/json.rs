//! A tiny JSON reader for client output (`qemu-img --output=json`, `nbdinfo --json`), so the
//! tests need no extra crates. Numbers keep their text, so 2^63-1 survives exactly.

use std::fmt;

#[derive(Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Value>),
    Obj(Vec<(String, Value)>),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Num(n) => write!(f, "{n}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Arr(a) => f.debug_list().entries(a).finish(),
            Value::Obj(o) => f.debug_map().entries(o.iter().map(|(k, v)| (k, v))).finish(),
        }
    }
}

impl Value {
    /// Member `key` of an object; panics if this is not an object or the key is missing.
    pub fn get(&self, key: &str) -> &Value {
        self.try_get(key).unwrap_or_else(|| panic!("JSON: no key {key:?} in {self:?}"))
    }

    pub fn try_get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Obj(o) => o.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> u64 {
        match self {
            Value::Num(n) => n.parse().unwrap_or_else(|_| panic!("JSON: {n} is not a u64")),
            _ => panic!("JSON: {self:?} is not a number"),
        }
    }

    pub fn as_bool(&self) -> bool {
        match self {
            Value::Bool(b) => *b,
            _ => panic!("JSON: {self:?} is not a bool"),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Value::Str(s) => s,
            _ => panic!("JSON: {self:?} is not a string"),
        }
    }

    pub fn as_array(&self) -> &[Value] {
        match self {
            Value::Arr(a) => a,
            _ => panic!("JSON: {self:?} is not an array"),
        }
    }
}

/// Parse a complete JSON document.
pub fn parse(text: &str) -> Value {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let v = p.value();
    p.ws();
    assert!(p.i == p.s.len(), "JSON: trailing data at byte {} in {text:?}", p.i);
    v
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> u8 {
        self.ws();
        *self.s.get(self.i).unwrap_or_else(|| panic!("JSON: unexpected end of input"))
    }

    fn expect(&mut self, c: u8) {
        let got = self.peek();
        assert!(got == c, "JSON: expected {:?} at byte {}, got {:?}", c as char, self.i, got as char);
        self.i += 1;
    }

    fn literal(&mut self, word: &str, v: Value) -> Value {
        assert!(self.s[self.i..].starts_with(word.as_bytes()), "JSON: bad literal at byte {}", self.i);
        self.i += word.len();
        v
    }

    fn value(&mut self) -> Value {
        match self.peek() {
            b'{' => {
                self.i += 1;
                let mut members = Vec::new();
                if self.peek() == b'}' {
                    self.i += 1;
                    return Value::Obj(members);
                }
                loop {
                    let k = self.string();
                    self.expect(b':');
                    let v = self.value();
                    members.push((k, v));
                    match self.peek() {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Value::Obj(members);
                        }
                        c => panic!("JSON: unexpected {:?} in object at byte {}", c as char, self.i),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if self.peek() == b']' {
                    self.i += 1;
                    return Value::Arr(items);
                }
                loop {
                    items.push(self.value());
                    match self.peek() {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Value::Arr(items);
                        }
                        c => panic!("JSON: unexpected {:?} in array at byte {}", c as char, self.i),
                    }
                }
            }
            b'"' => Value::Str(self.string()),
            b't' => self.literal("true", Value::Bool(true)),
            b'f' => self.literal("false", Value::Bool(false)),
            b'n' => self.literal("null", Value::Null),
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_digit() || b"+-.eE".contains(&self.s[self.i]))
                {
                    self.i += 1;
                }
                assert!(self.i > start, "JSON: unexpected byte at {start}");
                Value::Num(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }

    fn string(&mut self) -> String {
        self.expect(b'"');
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.i).expect("JSON: unterminated string");
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).expect("hex");
                            let cp = u32::from_str_radix(hex, 16).expect("JSON: bad \\u escape");
                            self.i += 4;
                            let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                            let mut b = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
