//! Protocol detection: a pure decision over the first bytes a client sent. No I/O here; the
//! `classify` stage feeds it bytes as they arrive and acts on the answer.

use std::borrow::Cow;

/// What the bytes so far say about the client's protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detection {
    /// Not decidable yet: read more (unless the buffer is full or time is up).
    NeedMore,
    /// The HTTP/2 connection preface (h2c prior knowledge, gRPC included).
    Http2,
    /// A valid HTTP/1.x request line.
    Http1,
    /// A TLS ClientHello; the server name, when the client sent one.
    Tls { sni: Option<String> },
    /// Anything else.
    Opaque,
}

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 frame header: length(3) type(1) flags(1) stream id(4).
const HTTP2_FRAME_HEADER: usize = 9;
const HTTP2_SETTINGS: u8 = 0x4;

/// Whether a server's first bytes are an HTTP/2 SETTINGS frame: an h2c server may send its
/// connection preface as soon as the connection opens, before the client's. That is HTTP/2
/// talking, not a server-first protocol.
pub fn is_http2_server_preface(buf: &[u8]) -> bool {
    let Some(header) = buf.get(..HTTP2_FRAME_HEADER) else {
        return false;
    };
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    header[3] == HTTP2_SETTINGS && header[4] & !0x1 == 0 && stream == 0 && length.is_multiple_of(6)
}

/// Longest request line we wait for before calling the client opaque.
const MAX_REQUEST_LINE: usize = 8 * 1024;
const MAX_METHOD: usize = 20;

pub fn detect(buf: &[u8]) -> Detection {
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    if let Some(decision) = detect_http2(buf) {
        return decision;
    }
    if buf[0] == TLS_HANDSHAKE {
        return detect_tls(buf);
    }
    detect_http1(buf)
}

fn detect_http2(buf: &[u8]) -> Option<Detection> {
    let common = buf.len().min(HTTP2_PREFACE.len());
    if buf[..common] != HTTP2_PREFACE[..common] {
        return None;
    }
    // "PRI * HTTP/2.0" is also a well-formed HTTP/1 request line; only the full preface counts.
    Some(if common == HTTP2_PREFACE.len() {
        Detection::Http2
    } else {
        Detection::NeedMore
    })
}

/// `METHOD SP request-target SP HTTP/1.x CRLF`
fn detect_http1(buf: &[u8]) -> Detection {
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        // As long as when the LF had not come yet: the verdict must not depend on how the
        // bytes were split into reads.
        Some(end) if end >= MAX_REQUEST_LINE => return Detection::Opaque,
        Some(end) => buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]),
        None if buf.len() >= MAX_REQUEST_LINE => return Detection::Opaque,
        None => buf,
    };
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next();
    let version = parts.next();
    let complete = line_end.is_some();
    // A space ends the method, complete line or not: " / HTTP/1.1" is no request line.
    if !is_method(method, target.is_some()) {
        return Detection::Opaque;
    }
    let Some(target) = target else {
        return if complete {
            Detection::Opaque
        } else {
            Detection::NeedMore
        };
    };
    if target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Detection::Opaque;
    }
    let Some(version) = version else {
        return if complete {
            Detection::Opaque
        } else {
            Detection::NeedMore
        };
    };
    if target.is_empty() {
        return Detection::Opaque;
    }
    match (complete, version) {
        (true, b"HTTP/1.0" | b"HTTP/1.1") => Detection::Http1,
        (true, _) => Detection::Opaque,
        // The whole version and the CR of the line's end; its LF is still to come.
        (false, b"HTTP/1.0\r" | b"HTTP/1.1\r") => Detection::NeedMore,
        (false, partial)
            if b"HTTP/1.1".starts_with(partial) || b"HTTP/1.0".starts_with(partial) =>
        {
            Detection::NeedMore
        }
        (false, _) => Detection::Opaque,
    }
}

/// A method token (RFC 9110 tchar), uppercase letters in practice; `finished` when the whole
/// token has been seen.
fn is_method(method: &[u8], finished: bool) -> bool {
    let valid_chars = method
        .iter()
        .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_');
    valid_chars && method.len() <= MAX_METHOD && (!finished || !method.is_empty())
}

const TLS_HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME_EXTENSION: u16 = 0x0000;
const HOST_NAME: u8 = 0x00;

/// A TLS ClientHello: `16 03 0x len(2) | 01 len(3) ...`. A client may split its hello across
/// several handshake records (RFC 8446 section 5.1; some do, to get past middleboxes that read
/// only the first record): the hello is read from the records' bodies put together.
fn detect_tls(buf: &[u8]) -> Detection {
    let Some(first) = RecordHeader::read(buf) else {
        return needs_more_if(buf.len() < RECORD_HEADER && tls_header_plausible(buf));
    };
    if !first.is_handshake() {
        return Detection::Opaque;
    }
    match buf.get(RECORD_HEADER) {
        None => return Detection::NeedMore,
        Some(&CLIENT_HELLO) => {}
        Some(_) => return Detection::Opaque,
    }
    match first_handshake_message(buf) {
        Ok(message) => Detection::Tls {
            sni: sni_in_hello(&mut Reader::new(&message[HANDSHAKE_HEADER..])),
        },
        Err(Unfinished::Truncated) => Detection::NeedMore,
        // It began as TLS; a later record that is not a handshake record means a broken hello.
        Err(Unfinished::Broken) => Detection::Tls { sni: None },
    }
}

fn tls_header_plausible(buf: &[u8]) -> bool {
    buf.get(1).is_none_or(|&major| major == 3) && buf.get(2).is_none_or(|&minor| minor <= 4)
}

fn needs_more_if(condition: bool) -> Detection {
    if condition {
        Detection::NeedMore
    } else {
        Detection::Opaque
    }
}

const RECORD_HEADER: usize = 5;
/// msg_type(1) length(3).
const HANDSHAKE_HEADER: usize = 4;

/// `type(1) version(2) length(2)`.
struct RecordHeader {
    kind: u8,
    major: u8,
    minor: u8,
    len: usize,
}

impl RecordHeader {
    fn read(buf: &[u8]) -> Option<Self> {
        let header = buf.get(..RECORD_HEADER)?;
        Some(Self {
            kind: header[0],
            major: header[1],
            minor: header[2],
            len: usize::from(u16::from_be_bytes([header[3], header[4]])),
        })
    }

    /// A non-empty handshake record of TLS 1.0-1.3 (records never say 1.3 on the wire, but
    /// clients write 3.1 to 3.3 and a 3.4 does no harm).
    fn is_handshake(&self) -> bool {
        self.kind == TLS_HANDSHAKE && self.major == 3 && self.minor <= 4 && self.len > 0
    }
}

struct Truncated;

enum Unfinished {
    /// More records (or more of one) are needed.
    Truncated,
    /// A record the message needs is not a handshake record.
    Broken,
}

/// The handshake message that starts `buf`'s first record, header included: borrowed when
/// that record holds all of it (nearly always), else put together from the records it spans.
fn first_handshake_message(buf: &[u8]) -> Result<Cow<'_, [u8]>, Unfinished> {
    let mut rest = buf;
    let mut gathered: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    loop {
        let Some(header) = RecordHeader::read(rest) else {
            let plausible = rest.first().is_none_or(|&kind| kind == TLS_HANDSHAKE)
                && tls_header_plausible(rest);
            return Err(if plausible {
                Unfinished::Truncated
            } else {
                Unfinished::Broken
            });
        };
        if !header.is_handshake() {
            return Err(Unfinished::Broken);
        }
        let body = &rest[RECORD_HEADER..];
        let fragment = &body[..body.len().min(header.len)];
        gathered = if gathered.is_empty() {
            Cow::Borrowed(fragment)
        } else {
            let mut joined = gathered.into_owned();
            joined.extend_from_slice(fragment);
            Cow::Owned(joined)
        };
        if let Some(whole) = handshake_len(&gathered).filter(|&len| gathered.len() >= len) {
            return Ok(match gathered {
                Cow::Borrowed(bytes) => Cow::Borrowed(&bytes[..whole]),
                Cow::Owned(mut bytes) => {
                    bytes.truncate(whole);
                    Cow::Owned(bytes)
                }
            });
        }
        if fragment.len() < header.len {
            return Err(Unfinished::Truncated);
        }
        rest = &body[header.len..];
    }
}

/// A handshake message's whole length (header included), once its header is there.
fn handshake_len(message: &[u8]) -> Option<usize> {
    let header = message.get(..HANDSHAKE_HEADER)?;
    let body =
        (usize::from(header[1]) << 16) | (usize::from(header[2]) << 8) | usize::from(header[3]);
    Some(HANDSHAKE_HEADER + body)
}

fn sni_in_hello(hello: &mut Reader<'_>) -> Option<String> {
    hello.skip(2 + 32).ok()?; // client_version, random
    let session_id = hello.u8()?;
    hello.skip(usize::from(session_id)).ok()?;
    let ciphers = hello.u16()?;
    hello.skip(usize::from(ciphers)).ok()?;
    let compression = hello.u8()?;
    hello.skip(usize::from(compression)).ok()?;
    let extensions_len = hello.u16()?;
    let mut extensions = hello.take(usize::from(extensions_len)).ok()?;
    while !extensions.at_end() {
        let kind = extensions.u16()?;
        let len = extensions.u16()?;
        let mut body = extensions.take(usize::from(len)).ok()?;
        if kind == SERVER_NAME_EXTENSION {
            return server_name(&mut body);
        }
    }
    None
}

/// What to call a client whose bytes stayed undecidable until the buffer filled or time ran
/// out: a TLS record header still means TLS (without a name we could read), else opaque.
pub fn undecided(buf: &[u8]) -> Detection {
    if buf.first() == Some(&TLS_HANDSHAKE) && buf.len() >= 3 && tls_header_plausible(buf) {
        Detection::Tls { sni: None }
    } else {
        Detection::Opaque
    }
}

/// The first host_name in a server_name extension body, if it is a sane DNS name.
fn server_name(body: &mut Reader<'_>) -> Option<String> {
    let _list_len = body.u16()?;
    if body.u8()? != HOST_NAME {
        return None;
    }
    let len = body.u16()?;
    let name = body.take(usize::from(len)).ok()?.rest();
    let valid = !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    valid.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// A bounds-checked cursor over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn at_end(&self) -> bool {
        self.buf.is_empty()
    }

    fn rest(&self) -> &'a [u8] {
        self.buf
    }

    fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(first)
    }

    fn u16(&mut self) -> Option<u16> {
        let bytes = self.buf.get(..2)?;
        self.buf = &self.buf[2..];
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn take(&mut self, len: usize) -> Result<Reader<'a>, Truncated> {
        let taken = self.buf.get(..len).ok_or(Truncated)?;
        self.buf = &self.buf[len..];
        Ok(Reader::new(taken))
    }

    fn skip(&mut self, len: usize) -> Result<(), Truncated> {
        self.take(len).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_needs_more() {
        assert_eq!(detect(b""), Detection::NeedMore);
    }

    #[test]
    fn http2_preface_in_fragments() {
        for cut in 1..HTTP2_PREFACE.len() {
            assert_eq!(
                detect(&HTTP2_PREFACE[..cut]),
                Detection::NeedMore,
                "cut at {cut}"
            );
        }
        assert_eq!(detect(HTTP2_PREFACE), Detection::Http2);
        let mut with_settings = HTTP2_PREFACE.to_vec();
        with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(detect(&with_settings), Detection::Http2);
    }

    #[test]
    fn http2_server_preface() {
        // SETTINGS, 2 settings (12 bytes), no flags, stream 0.
        let settings = [
            0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0,
        ];
        assert!(is_http2_server_preface(&settings));
        assert!(is_http2_server_preface(&settings[..9]));
        assert!(!is_http2_server_preface(&settings[..8]));
        assert!(!is_http2_server_preface(b"220 smtp.mesh.test ESMTP\r\n"));
        let mut on_a_stream = settings;
        on_a_stream[8] = 1;
        assert!(!is_http2_server_preface(&on_a_stream));
    }

    #[test]
    fn http1_request_lines() {
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Detection::Http1
        );
        assert_eq!(detect(b"POST /upload?x=1 HTTP/1.0\r\n"), Detection::Http1);
        assert_eq!(
            detect(b"CONNECT example.test:443 HTTP/1.1\r\n"),
            Detection::Http1
        );
        assert_eq!(detect(b"GET / HTTP/1.1\n"), Detection::Http1);
    }

    #[test]
    fn http1_fragments_need_more() {
        let request = b"GET /index.html HTTP/1.1\r\n";
        for cut in 1..request.len() {
            assert_eq!(detect(&request[..cut]), Detection::NeedMore, "cut at {cut}");
        }
    }

    /// Found by fuzz/ (detect): a read ending between the CR and the LF of the request line
    /// made the connection opaque, though the next byte would have made it HTTP/1.
    #[test]
    fn request_line_cut_between_cr_and_lf_needs_more() {
        assert_eq!(detect(b"GET / HTTP/1.1\r"), Detection::NeedMore);
        assert_eq!(detect(b"GET / HTTP/1.0\r"), Detection::NeedMore);
        assert_eq!(detect(b"GET / HTTP/1.\r"), Detection::Opaque);
        assert_eq!(detect(b"GET / HTTP/1.1\rX"), Detection::Opaque);
    }

    /// Found by fuzz/ (detect): a leading space (an empty method) waited for the line's end
    /// (or the detection timeout) instead of being opaque at once.
    #[test]
    fn empty_method_is_opaque_before_the_line_ends() {
        assert_eq!(detect(b" / HTTP/1.1"), Detection::Opaque);
        assert_eq!(detect(b" /"), Detection::Opaque);
        assert_eq!(detect(b" / HTTP/1.1\r\n"), Detection::Opaque);
    }

    /// Found by fuzz/ (detect): a request line longer than MAX_REQUEST_LINE was HTTP/1 when
    /// its LF came in the same read, opaque when the first read stopped before it.
    #[test]
    fn overlong_request_line_is_opaque_however_it_arrives() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST_LINE, b'a');
        line.extend_from_slice(b" HTTP/1.1\r\n");
        assert_eq!(detect(&line[..MAX_REQUEST_LINE]), Detection::Opaque);
        assert_eq!(detect(&line), Detection::Opaque);
    }

    #[test]
    fn not_http1() {
        assert_eq!(detect(b"GET / HTTP/2.0\r\n"), Detection::Opaque);
        assert_eq!(detect(b"GET /\r\n"), Detection::Opaque);
        assert_eq!(detect(b"get / HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(detect(b"GET  HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(detect(b"GET /a\x01b HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(detect(b"*1\r\n$4\r\nPING\r\n"), Detection::Opaque); // redis
        assert_eq!(detect(b"get key\r\n"), Detection::Opaque); // memcached
        assert_eq!(detect(b"\x00\x01\x02garbage"), Detection::Opaque);
        assert_eq!(detect(b"GET / HTTQ"), Detection::Opaque);
        assert_eq!(detect(b"AVERYLONGMETHODNAMEWITHOUTEND"), Detection::Opaque);
    }

    #[test]
    fn endless_request_line_is_opaque() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST_LINE, b'a');
        assert_eq!(detect(&line), Detection::Opaque);
    }

    /// A minimal ClientHello with an optional SNI extension.
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut extensions = Vec::new();
        if let Some(name) = sni {
            let name = name.as_bytes();
            let mut entry = vec![HOST_NAME];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name);
            let mut body = (entry.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(&entry);
            extensions.extend_from_slice(&SERVER_NAME_EXTENSION.to_be_bytes());
            extensions.extend_from_slice(&(body.len() as u16).to_be_bytes());
            extensions.extend_from_slice(&body);
        }
        // An unrelated extension (supported_groups) first, so the walk has to skip it.
        let mut all = vec![0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d];
        all.extend_from_slice(&extensions);
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[0x11; 32]);
        hello.push(0); // session id
        hello.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        hello.extend_from_slice(&[0x01, 0x00]); // null compression
        hello.extend_from_slice(&(all.len() as u16).to_be_bytes());
        hello.extend_from_slice(&all);
        let mut handshake = vec![CLIENT_HELLO, 0];
        handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
        handshake.extend_from_slice(&hello);
        let mut record = vec![TLS_HANDSHAKE, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn tls_client_hello_with_sni() {
        let hello = client_hello(Some("API.Example.test"));
        assert_eq!(
            detect(&hello),
            Detection::Tls {
                sni: Some("api.example.test".into())
            }
        );
    }

    #[test]
    fn tls_client_hello_without_sni() {
        assert_eq!(detect(&client_hello(None)), Detection::Tls { sni: None });
    }

    #[test]
    fn tls_fragments_need_more() {
        let hello = client_hello(Some("a.test"));
        for cut in 1..hello.len() {
            assert_eq!(detect(&hello[..cut]), Detection::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn undecided_tls_is_still_tls() {
        let hello = client_hello(Some("a.test"));
        assert_eq!(undecided(&hello[..40]), Detection::Tls { sni: None });
        assert_eq!(undecided(b"GET /very-long"), Detection::Opaque);
    }

    #[test]
    fn not_tls() {
        assert_eq!(
            detect(&[TLS_HANDSHAKE, 0x07, 0x01, 0, 5, 1]),
            Detection::Opaque
        );
        assert_eq!(
            detect(&[TLS_HANDSHAKE, 0x03, 0x03, 0, 5, 2]),
            Detection::Opaque
        );
        assert_eq!(detect(&[TLS_HANDSHAKE, 0x09]), Detection::Opaque);
    }

    /// The handshake message of a one-record hello, cut into records of at most `size` bytes.
    fn in_records(hello: &[u8], size: usize) -> Vec<u8> {
        let message = &hello[RECORD_HEADER..];
        let mut records = Vec::new();
        for fragment in message.chunks(size) {
            records.extend_from_slice(&[TLS_HANDSHAKE, 0x03, 0x01]);
            records.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
            records.extend_from_slice(fragment);
        }
        records
    }

    #[test]
    fn a_hello_split_across_records_keeps_its_name() {
        let hello = client_hello(Some("Split.Example.test"));
        let want = Detection::Tls {
            sni: Some("split.example.test".into()),
        };
        for size in [1, 2, 3, 4, 5, 7, 40, hello.len() - 6] {
            let records = in_records(&hello, size);
            assert_eq!(detect(&records), want, "records of {size}");
            for cut in 1..records.len() {
                assert_eq!(
                    detect(&records[..cut]),
                    Detection::NeedMore,
                    "records of {size}, cut at {cut}"
                );
            }
            let mut followed = records.clone();
            followed.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0xff]);
            assert_eq!(detect(&followed), want, "records of {size}, then data");
        }
    }

    #[test]
    fn a_split_hello_broken_by_another_record_has_no_name() {
        let records = in_records(&client_hello(Some("a.test")), 20);
        let mut broken = records[..25].to_vec();
        // An application-data record where the hello's second fragment belongs.
        broken.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0xff]);
        broken.extend_from_slice(&records[25..]);
        assert_eq!(detect(&broken), Detection::Tls { sni: None });
        assert_eq!(detect(&broken[..26]), Detection::Tls { sni: None });
        let mut empty_record = records[..25].to_vec();
        empty_record.extend_from_slice(&[TLS_HANDSHAKE, 0x03, 0x01, 0, 0]);
        assert_eq!(detect(&empty_record), Detection::Tls { sni: None });
    }

    #[test]
    fn hostile_sni_is_dropped() {
        let hello = client_hello(Some("evil\"}\nname"));
        assert_eq!(detect(&hello), Detection::Tls { sni: None });
    }
}
