//! The subject of an X.509 certificate as RFC 4514 text ("CN=alice,O=Example"), the form
//! GnuTLS gives nbdkit's `nbdkit_peer_tls_dn`. A small DER reader instead of a full X.509
//! parser: only the path to the subject Name is walked, every length is bounds-checked, and
//! anything unexpected gives `None` rather than a panic.

/// One DER element: its tag, its contents, and what follows it.
pub(super) struct Tlv<'a> {
    pub(super) tag: u8,
    pub(super) body: &'a [u8],
    pub(super) whole: &'a [u8],
    pub(super) rest: &'a [u8],
}

/// The first DER element of `input`, bounds-checked; `None` if it is not one.
pub(super) fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
    let (&tag, after_tag) = input.split_first()?;
    // Multi-byte tags never occur on the path we walk.
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut after_len) = after_tag.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || after_len.len() < n {
            return None;
        }
        let mut l = 0usize;
        for &b in &after_len[..n] {
            l = (l << 8) | usize::from(b);
        }
        after_len = &after_len[n..];
        l
    };
    if after_len.len() < len {
        return None;
    }
    let header = input.len() - after_len.len();
    Some(Tlv { tag, body: &after_len[..len], whole: &input[..header + len], rest: &after_len[len..] })
}

pub(super) const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject of a DER certificate in RFC 4514 form, or `None` if it cannot be read.
pub fn subject(cert_der: &[u8]) -> Option<String> {
    let cert = tlv(cert_der).filter(|t| t.tag == SEQUENCE)?;
    let tbs = tlv(cert.body).filter(|t| t.tag == SEQUENCE)?;
    let mut fields = tbs.body;
    // version [0] EXPLICIT is optional.
    let first = tlv(fields)?;
    if first.tag == 0xa0 {
        fields = first.rest;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        fields = tlv(fields)?.rest;
    }
    let name = tlv(fields).filter(|t| t.tag == SEQUENCE)?;
    format_name(name.body)
}

/// RDNSequence → RFC 4514: the last RDN first, RDNs joined by ',', multi-valued ones by '+'.
fn format_name(mut rdns: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while !rdns.is_empty() {
        let rdn = tlv(rdns).filter(|t| t.tag == SET)?;
        rdns = rdn.rest;
        let mut atvs = rdn.body;
        let mut values = Vec::new();
        while !atvs.is_empty() {
            let atv = tlv(atvs).filter(|t| t.tag == SEQUENCE)?;
            atvs = atv.rest;
            let oid = tlv(atv.body).filter(|t| t.tag == OID)?;
            let value = tlv(oid.rest)?;
            values.push(format!("{}={}", attribute_name(oid.body), attribute_value(&value)));
        }
        parts.push(values.join("+"));
    }
    parts.reverse();
    Some(parts.join(","))
}

/// Short names RFC 4514 defines, plus the ones GnuTLS prints; others as a dotted OID.
fn attribute_name(oid: &[u8]) -> String {
    const KNOWN: &[(&[u8], &str)] = &[
        (&[0x55, 0x04, 0x03], "CN"),
        (&[0x55, 0x04, 0x05], "serialNumber"),
        (&[0x55, 0x04, 0x06], "C"),
        (&[0x55, 0x04, 0x07], "L"),
        (&[0x55, 0x04, 0x08], "ST"),
        (&[0x55, 0x04, 0x09], "STREET"),
        (&[0x55, 0x04, 0x0a], "O"),
        (&[0x55, 0x04, 0x0b], "OU"),
        (&[0x55, 0x04, 0x0c], "title"),
        (&[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01], "UID"),
        (&[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19], "DC"),
        (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01], "EMAIL"),
    ];
    if let Some((_, n)) = KNOWN.iter().find(|(o, _)| *o == oid) {
        return (*n).to_string();
    }
    dotted_oid(oid).unwrap_or_else(|| format!("#{}", hex(oid)))
}

fn dotted_oid(oid: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut cur: u64 = 0;
    for &b in oid {
        cur = cur.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (cur / 40).min(2);
                arcs.push(first);
                arcs.push(cur - first * 40);
            } else {
                arcs.push(cur);
            }
            cur = 0;
        }
    }
    if arcs.is_empty() || oid.last().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    Some(arcs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join("."))
}

/// A string value escaped per RFC 4514; anything else as '#' and the hex of its DER encoding.
fn attribute_value(v: &Tlv<'_>) -> String {
    let text = match v.tag {
        // UTF8String, PrintableString, IA5String, NumericString, VisibleString.
        0x0c | 0x13 | 0x16 | 0x12 | 0x1a => std::str::from_utf8(v.body).ok().map(str::to_string),
        // TeletexString: in practice Latin-1.
        0x14 => Some(v.body.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UCS-2 big-endian.
        0x1e if v.body.len() & 1 == 0 => {
            let units: Vec<u16> = v.body.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    };
    match text {
        Some(t) => escape(&t),
        None => format!("#{}", hex(v.whole)),
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '#' if i == 0 => out.push_str("\\#"),
            '\0' => out.push_str("\\00"),
            c if c.is_control() => {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("\\{byte:02x}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if body.len() < 0x80 {
            v.push(body.len() as u8);
        } else {
            v.push(0x82);
            v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    fn atv(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        der(SEQUENCE, &[der(OID, oid), der(tag, value)].concat())
    }

    fn cert_with_subject(name_body: &[u8]) -> Vec<u8> {
        let tbs = [
            der(0xa0, &der(0x02, &[2])),
            der(0x02, &[1, 2, 3]),
            der(SEQUENCE, &der(OID, &[0x2a, 0x03])),
            der(SEQUENCE, &[]),
            der(SEQUENCE, &[der(0x17, b"250101000000Z"), der(0x17, b"350101000000Z")].concat()),
            der(SEQUENCE, name_body),
            der(SEQUENCE, &[]),
        ]
        .concat();
        der(SEQUENCE, &[der(SEQUENCE, &tbs), der(SEQUENCE, &[]), der(0x03, &[0])].concat())
    }

    #[test]
    fn rfc4514_order_and_names() {
        let name = [
            der(SET, &atv(&[0x55, 4, 6], 0x13, b"GB")),
            der(SET, &atv(&[0x55, 4, 10], 0x0c, b"Example, Inc.")),
            der(SET, &[atv(&[0x55, 4, 3], 0x0c, b"alice"), atv(&[0x55, 4, 11], 0x0c, b"ops")].concat()),
        ]
        .concat();
        assert_eq!(
            subject(&cert_with_subject(&name)).as_deref(),
            Some("CN=alice+OU=ops,O=Example\\, Inc.,C=GB")
        );
    }

    #[test]
    fn escapes_and_unknown_types() {
        assert_eq!(escape(" #a+b "), "\\ #a\\+b\\ ");
        assert_eq!(escape("#x"), "\\#x");
        let name = der(SET, &atv(&[0x2a, 0x03, 0x04], 0x04, &[0xde, 0xad]));
        assert_eq!(subject(&cert_with_subject(&name)).as_deref(), Some("1.2.3.4=#0402dead"));
        assert_eq!(dotted_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]).as_deref(), Some("1.2.840.113549"));
    }

    #[test]
    fn garbage_gives_none() {
        assert_eq!(subject(&[]), None);
        assert_eq!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject(&[0x30, 0x03, 0x30, 0x01]), None);
        let mut c = cert_with_subject(&der(SET, &atv(&[0x55, 4, 3], 0x0c, b"x")));
        c.truncate(c.len() / 2);
        assert_eq!(subject(&c), None);
    }
}
