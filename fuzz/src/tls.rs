//! A second, independently written reading of a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3),
//! with the agent's documented rules: a record header `16 03 0x` (x <= 4, non-zero length),
//! a ClientHello handshake, undecided until the handshake's declared length is all there; once
//! it is, a malformed hello has no server name. The handshake may span records (RFC 8446 5.1):
//! its bytes are the bodies of the records that follow each other, each of which must be such a
//! handshake record (else the hello is broken: TLS without a name). Only the first server_name extension, and in
//! it the first entry, counts; the name must be a plain DNS name (letters, digits, `.-_`) and
//! is reported lowercased. This one works with absolute offsets, the agent with a cursor.

use agent::detect::Detection;

pub const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 1;

/// What `detect` must say about `buf`, which starts with the TLS handshake record type.
pub fn expected(buf: &[u8]) -> Detection {
    assert_eq!(buf.first(), Some(&HANDSHAKE));
    let plausible_version =
        buf.get(1).is_none_or(|&b| b == 3) && buf.get(2).is_none_or(|&b| b <= 4);
    if buf.len() < 5 {
        return if plausible_version {
            Detection::NeedMore
        } else {
            Detection::Opaque
        };
    }
    let record_len = u16::from_be_bytes([buf[3], buf[4]]);
    if !plausible_version || record_len == 0 {
        return Detection::Opaque;
    }
    match buf.get(5) {
        None => return Detection::NeedMore,
        Some(&CLIENT_HELLO) => {}
        Some(_) => return Detection::Opaque,
    }
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            let partial = &buf[at..];
            let could_be_record = partial.first().is_none_or(|&b| b == HANDSHAKE)
                && partial.get(1).is_none_or(|&b| b == 3)
                && partial.get(2).is_none_or(|&b| b <= 4);
            return if could_be_record {
                Detection::NeedMore
            } else {
                Detection::Tls { sni: None }
            };
        };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != HANDSHAKE || header[1] != 3 || header[2] > 4 || len == 0 {
            return Detection::Tls { sni: None };
        }
        let end = buf.len().min(at + 5 + len);
        message.extend_from_slice(&buf[at + 5..end]);
        if let Some(length) = message.get(1..4) {
            let whole = 4
                + ((usize::from(length[0]) << 16)
                    | (usize::from(length[1]) << 8)
                    | usize::from(length[2]));
            if let Some(hello) = message.get(4..whole) {
                return Detection::Tls {
                    sni: sni_of_hello(hello),
                };
            }
        }
        if end < at + 5 + len {
            return Detection::NeedMore;
        }
        at = end;
    }
}

fn u8_at(buf: &[u8], at: usize) -> Option<usize> {
    buf.get(at).map(|&b| usize::from(b))
}

fn u16_at(buf: &[u8], at: usize) -> Option<usize> {
    let bytes = buf.get(at..at + 2)?;
    Some(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
}

/// The server name in a ClientHello body (after its 4-byte handshake header).
pub fn sni_of_hello(hello: &[u8]) -> Option<String> {
    // legacy_version(2) random(32) session_id<0..32> cipher_suites<2..> compression<1..>
    let mut at = 34;
    at += 1 + u8_at(hello, at)?;
    at += 2 + u16_at(hello, at)?;
    at += 1 + u8_at(hello, at)?;
    let extensions_len = u16_at(hello, at)?;
    let extensions = hello.get(at + 2..at + 2 + extensions_len)?;
    let mut at = 0;
    while at < extensions.len() {
        let kind = u16_at(extensions, at)?;
        let len = u16_at(extensions, at + 2)?;
        let body = extensions.get(at + 4..at + 4 + len)?;
        if kind == 0 {
            return server_name(body);
        }
        at += 4 + len;
    }
    None
}

/// The first host_name entry of a server_name extension's body, if a sane DNS name.
pub fn server_name(body: &[u8]) -> Option<String> {
    // server_name_list<1..2^16-1>: its length is not checked against the body (as the agent).
    let _list_len = u16_at(body, 0)?;
    if *body.get(2)? != 0 {
        return None;
    }
    let len = u16_at(body, 3)?;
    let name = body.get(5..5 + len)?;
    let sane = !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    sane.then(|| {
        name.iter()
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect()
    })
}
