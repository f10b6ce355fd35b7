//! The HTTP/1 request head parser (`parse_request`), on a client's bytes.
//!
//! Asserts, for any bytes:
//! - it accepts exactly what httparse (same limits) takes as a complete head, at the same
//!   length, with httparse's method and target; httparse's incomplete is "need more" below
//!   64 KiB and "too large" from there; its errors are ours (too many fields: too large);
//! - of the complete heads, it refuses exactly those with a bare LF and those whose framing
//!   the reference in `sockmesh_fuzz::http` calls ambiguous, and frames, persists, tunnels and names the
//!   authority of the rest as the reference does;
//! - parsing any prefix gives "need more" before the head's end and the same head after it
//!   (the forwarder parses its growing buffer after every read);
//! - against hyper's HTTP/1 server: whenever both accept the request, both frame its body the
//!   same way (no body, the same Content-Length, or chunked): no request is smuggled past the
//!   agent to a hyper server. Where they differ in what they accept is documented below.
#![no_main]

use agent::fuzzing::{Framing, HeadError, MAX_HEAD_BYTES, RequestHead, parse_request};
use libfuzzer_sys::fuzz_target;
use sockmesh_fuzz::{
    HyperBody, cuts,
    http::{FramingFields, MAX_HEADERS},
    hyper_server,
};

fuzz_target!(|buf: &[u8]| {
    let parsed = parse_request(buf);
    let complete = check_against_httparse(buf, &parsed);
    prefixes_agree(buf, &parsed);
    if complete {
        check_against_hyper(buf, &parsed);
    }
});

/// Returns whether httparse found a complete head.
fn check_against_httparse(buf: &[u8], parsed: &Result<Option<RequestHead>, HeadError>) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Err(httparse::Error::TooManyHeaders) => {
            assert_eq!(parsed, &Err(HeadError::TooLarge));
            return false;
        }
        Err(error) => {
            assert_eq!(parsed, &Err(HeadError::Malformed(error)));
            return false;
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            assert_eq!(parsed, &Err(HeadError::TooLarge));
            return false;
        }
        Ok(httparse::Status::Partial) => {
            assert_eq!(parsed, &Ok(None));
            return false;
        }
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            assert_eq!(parsed, &Err(HeadError::TooLarge));
            return false;
        }
        Ok(httparse::Status::Complete(len)) => len,
    };
    // Every line ends in CRLF: a bare LF is a line's end to httparse and maybe not to the
    // server, so such a head is refused before its fields are read.
    let bare_lf = (0..len).any(|at| buf[at] == b'\n' && (at == 0 || buf[at - 1] != b'\r'));
    if bare_lf {
        assert_eq!(parsed, &Err(HeadError::Framing));
        return true;
    }
    let (method, target, version) = (
        request.method.expect("complete"),
        request.path.expect("complete"),
        request.version.expect("complete"),
    );
    let fields = FramingFields::of(request.headers);
    let Some(framing) = fields.request_framing(version) else {
        assert_eq!(parsed, &Err(HeadError::Framing), "fields {fields:?}");
        return true;
    };
    if fields.host_fields > 1 {
        assert_eq!(parsed, &Err(HeadError::Host), "fields {fields:?}");
        return true;
    }
    let head = match parsed {
        Ok(Some(head)) => head,
        other => panic!("refused a head the reference accepts ({fields:?}): {other:?}"),
    };
    let connect = method == "CONNECT";
    let authority = if connect {
        target.to_string()
    } else if let Some((_, rest)) = target
        .split_once("://")
        .filter(|_| !target.starts_with('/'))
    {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        rest[..end].to_string()
    } else {
        fields.host.clone().unwrap_or_default()
    };
    let want = RequestHead {
        len,
        method: method.to_string(),
        target: target.to_string(),
        authority,
        framing,
        keep_alive: fields.keep_alive(version),
        wants_tunnel: connect || fields.upgrade,
    };
    assert_eq!(head, &want);
    let path = head.path();
    assert!(
        connect || target.contains(path) || path == "/",
        "path {path:?} of {target:?}"
    );
    assert!(!path.contains(['?', '#']), "path {path:?}");
    true
}

/// The forwarder parses the buffer after every read: a prefix of the head is never a head,
/// and what follows a head never changes it.
fn prefixes_agree(buf: &[u8], full: &Result<Option<RequestHead>, HeadError>) {
    let head_len = match full {
        Ok(Some(head)) => Some(head.len),
        _ => None,
    };
    for cut in cuts(buf.len(), head_len.as_slice()) {
        let prefix = parse_request(&buf[..cut]);
        match head_len {
            Some(len) if cut >= len => assert_eq!(&prefix, full, "cut at {cut}"),
            Some(_) => assert_eq!(prefix, Ok(None), "cut at {cut}, inside the head"),
            // An error may show only once its bytes are there; a prefix of an incomplete head
            // is incomplete too.
            None if full.is_err() => {
                assert!(
                    matches!(prefix, Ok(None) | Err(_)),
                    "cut at {cut}: {prefix:?}"
                );
            }
            None => assert_eq!(prefix, Ok(None), "cut at {cut}"),
        }
    }
}

/// Where both accept, they agree on where the body ends. Known differences in acceptance
/// (each on the safe side, or hyper's own limits):
/// - hyper drops Content-Length after Transfer-Encoding (and closes after the message);
///   the agent refuses both together (400);
/// - hyper takes a Content-Length of up to 20 digits, the agent at most 19, as one value per
///   field; the agent also takes a list of equal values ("5, 5"), which hyper refuses;
/// - the agent takes a coding list ending in an empty element ("chunked,") as chunked, hyper
///   refuses it; hyper refuses targets that are not URIs (`http::Uri`) and targets over
///   65534 bytes, and non-UTF-8 Transfer-Encoding only the agent refuses.
fn check_against_hyper(buf: &[u8], parsed: &Result<Option<RequestHead>, HeadError>) {
    let Some(served) = hyper_server(buf, false) else {
        return;
    };
    let head = match parsed {
        Ok(Some(head)) => head,
        // The agent refuses what hyper takes: safe (the client gets 400).
        Err(HeadError::Framing | HeadError::Host) => return,
        other => panic!("hyper served a request the agent has as {other:?}: {served:?}"),
    };
    assert_eq!(head.method, served.method);
    let agrees = match (head.framing, served.body) {
        (Framing::Empty, HyperBody::Empty) | (Framing::Chunked, HyperBody::Unsized) => true,
        (Framing::Length(ours), HyperBody::Length(theirs)) => ours == theirs,
        _ => false,
    };
    assert!(
        agrees,
        "body framing: agent {:?}, hyper {:?}",
        head.framing, served.body
    );
}
