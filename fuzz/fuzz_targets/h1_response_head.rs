//! The HTTP/1 response head parser (`parse_response`), on a server's bytes, for each kind of
//! request the framing depends on.
//!
//! The first input byte picks the request (GET, HEAD, CONNECT, a WebSocket upgrade, POST); the
//! rest is what the server sent. Asserts:
//! - it accepts exactly what httparse (same limits) takes as a complete response head, at the
//!   same length and status; httparse's incomplete is "need more" below 64 KiB and "too large"
//!   from there; its errors are ours;
//! - of the complete heads it refuses exactly those with an invalid Content-Length or a
//!   non-UTF-8 Transfer-Encoding, and frames (RFC 9112 6.3, in order), tunnels and persists
//!   the rest as the rules below say;
//! - parsing any prefix gives "need more" before the head's end and the same head after it;
//! - against hyper's HTTP/1 client sending the same request: whenever both accept a final
//!   response, the body is framed alike: none, the same length (hyper then reads exactly those
//!   bytes), or unsized, where hyper reads what the agent's framing says: the chunks' data of
//!   a chunked body the agent finds the end of, or everything up to the close.
#![no_main]

use agent::fuzzing::{Framing, HeadError, MAX_HEAD_BYTES, Remaining, RequestHead, ResponseHead};
use agent::fuzzing::{parse_request, parse_response};
use libfuzzer_sys::fuzz_target;
use sockmesh_fuzz::{
    HyperBody, chunked, cuts,
    http::{FramingFields, MAX_HEADERS, hyper_sees_chunked},
    hyper_client,
};

const REQUESTS: [(&str, bool, &str); 5] = [
    ("GET", false, "GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"),
    (
        "HEAD",
        false,
        "HEAD / HTTP/1.1\r\nHost: example.test\r\n\r\n",
    ),
    (
        "CONNECT",
        false,
        "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    ),
    (
        "GET",
        true,
        "GET / HTTP/1.1\r\nHost: example.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ),
    (
        "POST",
        false,
        "POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\n\r\n",
    ),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, buf)) = data.split_first() else {
        return;
    };
    let (method, upgrade, request) = REQUESTS[usize::from(pick) % REQUESTS.len()];
    let request = parse_request(request.as_bytes())
        .expect("a valid request")
        .expect("a whole request");
    let parsed = parse_response(buf, &request);
    check_against_httparse(buf, &request, &parsed);
    prefixes_agree(buf, &request, &parsed);
    if let Ok(Some(head)) = &parsed {
        check_against_hyper(method, upgrade, buf, head);
    }
});

fn check_against_httparse(
    buf: &[u8],
    request: &RequestHead,
    parsed: &Result<Option<ResponseHead>, HeadError>,
) {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Err(httparse::Error::TooManyHeaders) => {
            return assert_eq!(parsed, &Err(HeadError::TooLarge));
        }
        Err(error) => return assert_eq!(parsed, &Err(HeadError::Malformed(error))),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return assert_eq!(parsed, &Err(HeadError::TooLarge));
        }
        Ok(httparse::Status::Partial) => return assert_eq!(parsed, &Ok(None)),
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            return assert_eq!(parsed, &Err(HeadError::TooLarge));
        }
        Ok(httparse::Status::Complete(len)) => len,
    };
    let (status, version) = (
        response.code.expect("complete"),
        response.version.expect("complete"),
    );
    let fields = FramingFields::of(response.headers);
    if fields.bad_length || fields.bad_coding {
        return assert_eq!(parsed, &Err(HeadError::Framing), "fields {fields:?}");
    }
    let tunnel = if request.is_connect() {
        (200..300).contains(&status)
    } else {
        request.wants_tunnel && status == 101
    };
    let no_body =
        request.is_head() || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body || tunnel {
        Framing::Empty
    } else if fields.transfer_encoding && version == 0 {
        // HTTP/1.0 has no transfer codings: faulty framing, read to the close (RFC 9112 6.1).
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
    let want = ResponseHead {
        len,
        status,
        framing,
        keep_alive: fields.keep_alive(version) && framing != Framing::UntilClose,
        tunnel,
    };
    assert_eq!(parsed, &Ok(Some(want)), "fields {fields:?}");
}

fn prefixes_agree(
    buf: &[u8],
    request: &RequestHead,
    full: &Result<Option<ResponseHead>, HeadError>,
) {
    let head_len = match full {
        Ok(Some(head)) => Some(head.len),
        _ => None,
    };
    for cut in cuts(buf.len(), head_len.as_slice()) {
        let prefix = parse_response(&buf[..cut], request);
        match head_len {
            Some(len) if cut >= len => assert_eq!(&prefix, full, "cut at {cut}"),
            Some(_) => assert_eq!(prefix, Ok(None), "cut at {cut}, inside the head"),
            None if full.is_err() => {}
            None => assert_eq!(prefix, Ok(None), "cut at {cut}"),
        }
    }
}

/// Known differences in acceptance (the agent's side is a 502 or a closed connection):
/// hyper refuses Transfer-Encoding in HTTP/1.0 responses, status codes below 100, and a
/// Content-Length list ("5, 5"); it skips 1xx responses (the agent forwards them as interim).
/// And one in framing, skipped: an empty last element in Transfer-Encoding (`chunked,`),
/// which the agent ignores as RFC 9110 5.6.1 says, and hyper takes as the last coding.
fn check_against_hyper(method: &str, upgrade: bool, buf: &[u8], head: &ResponseHead) {
    if head.is_interim() {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let _ = response.parse(buf);
    let agent_chunked = FramingFields::of(response.headers).chunked_last;
    if agent_chunked != hyper_sees_chunked(response.headers) {
        return;
    }
    let Some(received) = hyper_client(method, upgrade, buf) else {
        return;
    };
    assert_eq!(received.status, head.status);
    let rest = &buf[head.len..];
    match (head.framing, received.body) {
        (Framing::Empty, HyperBody::Empty) => {}
        (Framing::Length(ours), HyperBody::Length(theirs)) => {
            assert_eq!(ours, theirs, "Content-Length");
            let whole = usize::try_from(ours).ok().and_then(|n| rest.get(..n));
            assert_eq!(received.body_bytes.as_deref(), whole, "the body hyper read");
        }
        (Framing::UntilClose, HyperBody::Unsized) => {
            // Everything up to the close, unless hyper read it as chunks.
            if let Some(bytes) = &received.body_bytes {
                assert_eq!(bytes.as_slice(), rest, "a body read to the close");
            }
        }
        (Framing::Chunked, HyperBody::Unsized) => {
            let mut remaining = Remaining::of(Framing::Chunked);
            let scanned = remaining.take(rest);
            if let Some(bytes) = &received.body_bytes {
                // hyper read the body to its end: so must the agent, with the same chunks.
                assert!(
                    scanned.is_err() || remaining.is_done(),
                    "hyper found the end of a chunked body the agent is still inside"
                );
                if let chunked::Outcome::Done { data, .. } = chunked::lenient(rest) {
                    assert_eq!(bytes, &data, "the chunks' data");
                }
            }
        }
        (ours, theirs) => panic!("body framing: agent {ours:?}, hyper {theirs:?}"),
    }
}
