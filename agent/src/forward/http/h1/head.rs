//! Message heads: what the HTTP/1 forwarder needs to know of a request or response head
//! (framing, persistence, upgrade, what the metrics and the tap show), parsed with httparse.
//! The head's bytes themselves are forwarded unchanged.

use std::str;

use super::body::Framing;

/// The most header fields a head may carry (as hyper allows).
const MAX_HEADERS: usize = 100;

/// The longest head the forwarder buffers; a longer request gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed head: {0}")]
    Malformed(httparse::Error),
    #[error("head too large")]
    TooLarge,
    #[error("invalid message framing")]
    Framing,
    /// More than one Host field: which one names the authority is ambiguous, and a server
    /// must refuse it (RFC 9112 3.2).
    #[error("more than one Host field")]
    Host,
}

/// What the forwarder keeps of a request head.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, including the final CRLF.
    pub len: usize,
    pub method: String,
    /// The request target (origin-form path and query, absolute-form URI, or authority-form).
    pub target: String,
    /// Host header, or the authority of an absolute-form or CONNECT target.
    pub authority: String,
    pub framing: Framing,
    pub keep_alive: bool,
    /// CONNECT, or an Upgrade header: a 101 (2xx for CONNECT) turns the connection into a tunnel.
    pub wants_tunnel: bool,
}

impl RequestHead {
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Safe to send again if the connection it went out on closed unanswered: idempotent
    /// (RFC 9110 9.2.2) and without a body to replay.
    pub fn is_retryable(&self) -> bool {
        self.framing == Framing::Empty
            && matches!(
                self.method.as_str(),
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            )
    }

    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }

    /// The path the tap shows: the target without its query (and without scheme and authority
    /// when absolute-form).
    pub fn path(&self) -> &str {
        if self.is_connect() {
            return "";
        }
        let without_authority = match absolute_form(&self.target) {
            Some(rest) => rest.find('/').map_or("/", |slash| &rest[slash..]),
            None => &self.target,
        };
        without_authority
            .split(['?', '#'])
            .next()
            .unwrap_or(without_authority)
    }
}

/// What the forwarder keeps of a response head.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    pub keep_alive: bool,
    /// 101 to an upgrade, or 2xx to CONNECT: raw bytes follow, both ways.
    pub tunnel: bool,
}

impl ResponseHead {
    /// 1xx other than 101: forwarded, then the final response follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// The request head at the start of `buf`, or None if it is not complete yet.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let Some(len) = head_len(request.parse(buf), buf)? else {
        return Ok(None);
    };
    if has_bare_lf(&buf[..len]) {
        return Err(HeadError::Framing);
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HeadError::Malformed(httparse::Error::Token));
    };
    let fields = Fields::of(request.headers)?;
    // HTTP/1.0 has no Transfer-Encoding: its framing is faulty (RFC 9112 6.1), and a server
    // that ignores the field would end the body elsewhere than a chunked reading.
    if fields.transfer_encoding && version == 0 {
        return Err(HeadError::Framing);
    }
    let framing = if fields.chunked_last {
        // Transfer-Encoding and Content-Length together is how requests are smuggled.
        if fields.content_length.is_some() {
            return Err(HeadError::Framing);
        }
        Framing::Chunked
    } else if fields.transfer_encoding {
        // A request body must end in chunked (RFC 9112 6.3).
        return Err(HeadError::Framing);
    } else {
        match fields.content_length {
            Some(0) | None => Framing::Empty,
            Some(length) => Framing::Length(length),
        }
    };
    if fields.host_fields > 1 {
        return Err(HeadError::Host);
    }
    let is_connect = method == "CONNECT";
    let authority = if is_connect {
        target.to_string()
    } else if let Some(rest) = absolute_form(target) {
        rest.split(['/', '?', '#']).next().unwrap_or("").to_string()
    } else {
        fields.host.unwrap_or_default().to_string()
    };
    Ok(Some(RequestHead {
        len,
        method: method.to_string(),
        target: target.to_string(),
        authority,
        framing,
        keep_alive: fields.keep_alive(version),
        wants_tunnel: is_connect || fields.upgrade,
    }))
}

/// Whether a line of `head` ends in a bare LF. httparse takes one as a line's end; a server
/// may not (RFC 9112 2.2 leaves it to the recipient) and, as RFC 9110 5.5 allows, read it as a
/// space inside a field's value: `X: y\nContent-Length: 40` would then carry no length, and
/// the body the agent forwards would be the server's next request.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(at, &byte)| byte == b'\n' && (at == 0 || head[at - 1] != b'\r'))
}

/// The response head at the start of `buf` for `request`, or None if not complete yet.
pub fn parse_response(
    buf: &[u8],
    request: &RequestHead,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let Some(len) = head_len(response.parse(buf), buf)? else {
        return Ok(None);
    };
    let (Some(status), Some(version)) = (response.code, response.version) else {
        return Err(HeadError::Malformed(httparse::Error::Status));
    };
    let fields = Fields::of(response.headers)?;
    let tunnel = request.wants_tunnel
        && if request.is_connect() {
            (200..300).contains(&status)
        } else {
            status == 101
        };
    // RFC 9112 6.3, in its order (a tunnel's bytes after the head are not a body).
    let no_body =
        request.is_head() || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body || tunnel {
        Framing::Empty
    } else if fields.transfer_encoding && version == 0 {
        // Faulty framing (RFC 9112 6.1): the connection ends the body, and is not reused.
        Framing::UntilClose
    } else if fields.chunked_last {
        Framing::Chunked
    } else if fields.transfer_encoding {
        Framing::UntilClose
    } else {
        match fields.content_length {
            Some(0) => Framing::Empty,
            Some(length) => Framing::Length(length),
            None => Framing::UntilClose,
        }
    };
    Ok(Some(ResponseHead {
        len,
        status,
        keep_alive: fields.keep_alive(version) && framing != Framing::UntilClose,
        framing,
        tunnel,
    }))
}

/// An absolute-form target ("http://host/path") without its scheme; None for the usual
/// origin-form ("/path"), which is checked first because nearly every request has it.
fn absolute_form(target: &str) -> Option<&str> {
    if target.starts_with('/') {
        return None;
    }
    target.split_once("://").map(|(_, rest)| rest)
}

/// The head's length once httparse has all of it; None while it is incomplete. A head over
/// the limit is refused whether it came in pieces or in one read (a read can hold more than
/// the limit), so where the client's segments fall never decides the answer.
fn head_len(parsed: httparse::Result<usize>, buf: &[u8]) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(error) => Err(HeadError::Malformed(error)),
    }
}

/// The header fields that decide framing and persistence.
#[derive(Default)]
struct Fields<'a> {
    host: Option<&'a str>,
    /// Host fields seen (requests: more than one is refused).
    host_fields: usize,
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// The last transfer coding is chunked.
    chunked_last: bool,
    close: bool,
    keep_alive: bool,
    upgrade: bool,
}

impl<'a> Fields<'a> {
    fn of(headers: &[httparse::Header<'a>]) -> Result<Self, HeadError> {
        let mut fields = Self::default();
        for header in headers {
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                let length = parse_content_length(header.value)?;
                // Repeated Content-Length fields must agree (RFC 9110 8.6).
                if fields.content_length.is_some_and(|seen| seen != length) {
                    return Err(HeadError::Framing);
                }
                fields.content_length = Some(length);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                fields.transfer_encoding = true;
                let value = str::from_utf8(header.value).map_err(|_| HeadError::Framing)?;
                // Optional whitespace is spaces and tabs only (RFC 9110 5.6.3): `str::trim`
                // would also take a no-break space (which httparse lets into values) and call
                // "chunked\u{a0}" chunked where a server sees an unknown coding.
                let codings = value.rsplit(',').map(|c| c.trim_matches([' ', '\t']));
                if let Some(last) = codings.into_iter().find(|c| !c.is_empty()) {
                    fields.chunked_last = last.eq_ignore_ascii_case("chunked");
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for option in header.value.split(|byte| *byte == b',') {
                    let option = option.trim_ascii();
                    fields.close |= option.eq_ignore_ascii_case(b"close");
                    fields.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case("upgrade") {
                fields.upgrade = true;
            } else if name.eq_ignore_ascii_case("host") {
                fields.host_fields += 1;
                if fields.host.is_none() {
                    fields.host = str::from_utf8(header.value).ok();
                }
            }
        }
        Ok(fields)
    }

    /// HTTP/1.1 persists unless told to close; HTTP/1.0 only when asked to keep alive.
    fn keep_alive(&self, minor_version: u8) -> bool {
        !self.close && (minor_version >= 1 || self.keep_alive)
    }
}

/// A Content-Length value: digits only (a list of equal values is allowed).
fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    let mut length = None;
    for part in value.split(|byte| *byte == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
            return Err(HeadError::Framing);
        }
        let parsed: u64 = str::from_utf8(part)
            .ok()
            .and_then(|digits| digits.parse().ok())
            .ok_or(HeadError::Framing)?;
        if length.is_some_and(|seen| seen != parsed) {
            return Err(HeadError::Framing);
        }
        length = Some(parsed);
    }
    length.ok_or(HeadError::Framing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(bytes: &str) -> RequestHead {
        parse_request(bytes.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn request_framing_and_persistence() {
        let get = request("GET /a?b=c HTTP/1.1\r\nHost: example.test\r\n\r\nrest");
        assert_eq!(get.len, 43);
        assert_eq!(get.framing, Framing::Empty);
        assert!(get.keep_alive);
        assert_eq!(get.authority, "example.test");
        assert_eq!(get.path(), "/a");

        let post = request("POST / HTTP/1.1\r\nContent-Length: 12\r\nConnection: close\r\n\r\n");
        assert_eq!(post.framing, Framing::Length(12));
        assert!(!post.keep_alive);

        let chunked = request("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(chunked.framing, Framing::Chunked);
        let old = request("POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\n");
        assert!(!old.keep_alive, "HTTP/1.0 closes by default");

        let absolute = request("GET http://other.test:81/x?y HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(absolute.authority, "other.test:81");
        assert_eq!(absolute.path(), "/x");

        let connect = request("CONNECT up.test:443 HTTP/1.1\r\nHost: up.test:443\r\n\r\n");
        assert!(connect.wants_tunnel);
        assert_eq!(connect.authority, "up.test:443");

        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
    }

    #[test]
    fn bad_requests_are_refused() {
        // Two Host fields: the authority is ambiguous.
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: b.test\r\n\r\n"),
            Err(HeadError::Host)
        );
        let refused = |bytes: &str| parse_request(bytes.as_bytes()).unwrap_err();
        assert!(matches!(
            refused("GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        for smuggling in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            // HTTP/1.0 has no chunked coding (RFC 9112 6.1; hyper refuses it too).
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            // Optional whitespace is SP and HTAB only: a no-break space makes another coding.
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\u{a0}\r\n\r\n",
            // A bare LF ends a line for httparse, maybe not for the server.
            "POST / HTTP/1.1\r\nHost: a\r\nX: y\nContent-Length: 40\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\n",
        ] {
            assert_eq!(refused(smuggling), HeadError::Framing, "{smuggling}");
        }
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(refused(&huge), HeadError::TooLarge);
        // Whole, but over the limit: refused as it would be in pieces.
        assert_eq!(refused(&format!("{huge}\r\n\r\n")), HeadError::TooLarge);
        let padding = "a".repeat(MAX_HEAD_BYTES - "GET / HTTP/1.1\r\nX: \r\n\r\n".len());
        let at_limit = format!("GET / HTTP/1.1\r\nX: {padding}\r\n\r\n");
        assert_eq!(request(&at_limit).len, MAX_HEAD_BYTES);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            HeadError::TooLarge
        );
    }

    #[test]
    fn codings_take_spaces_and_tabs_around_them() {
        for value in ["chunked", " chunked", "chunked\t", "gzip , \tchunked "] {
            let head = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {value}\r\n\r\n");
            assert_eq!(request(&head).framing, Framing::Chunked, "{value:?}");
        }
    }

    #[test]
    fn response_framing() {
        let get = request("GET / HTTP/1.1\r\n\r\n");
        let head = request("HEAD / HTTP/1.1\r\n\r\n");
        let response = |bytes: &str, request: &RequestHead| {
            parse_response(bytes.as_bytes(), request).unwrap().unwrap()
        };
        let ok = response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", &get);
        assert_eq!(
            (ok.status, ok.framing, ok.keep_alive),
            (200, Framing::Length(3), true)
        );
        let to_head = response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", &head);
        assert_eq!(to_head.framing, Framing::Empty);
        let no_length = response("HTTP/1.1 200 OK\r\n\r\n", &get);
        assert_eq!(no_length.framing, Framing::UntilClose);
        assert!(!no_length.keep_alive);
        let chunked = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get,
        );
        assert_eq!(chunked.framing, Framing::Chunked);
        let old_chunked = response(
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get,
        );
        assert_eq!(old_chunked.framing, Framing::UntilClose);
        assert!(!old_chunked.keep_alive);
        let not_modified = response(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            &get,
        );
        assert_eq!(not_modified.framing, Framing::Empty);
        let interim = response("HTTP/1.1 100 Continue\r\n\r\n", &get);
        assert!(interim.is_interim());

        let upgrade =
            request("GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
        let switching = response("HTTP/1.1 101 Switching Protocols\r\n\r\n", &upgrade);
        assert!(switching.tunnel && !switching.is_interim());
        let connect = request("CONNECT a:1 HTTP/1.1\r\n\r\n");
        assert!(response("HTTP/1.1 200 OK\r\n\r\n", &connect).tunnel);
        assert!(!response("HTTP/1.1 407 No\r\nContent-Length: 0\r\n\r\n", &connect).tunnel);

        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n", &get).is_err());
    }
}
