//! Protocol detection (`agent::detect`) on a client's (and a server's) first bytes.
//!
//! Asserts, for any bytes:
//! - `detect` agrees exactly with a reference classifier written from the documented rules:
//!   the HTTP/2 preface, a TLS ClientHello (`sockmesh_fuzz::tls`), an HTTP/1.x request line
//!   (complete: valid or not; incomplete: whether some continuation could still be valid);
//! - once a prefix of the input is decided, every longer prefix gets the same verdict (the
//!   classifier sees the bytes in whatever pieces TCP delivers them);
//! - `undecided` only ever says TLS (without a name) or opaque, TLS exactly when a plausible
//!   record header is there;
//! - `is_http2_server_preface` is exactly "a SETTINGS frame header on stream 0".
#![no_main]

use agent::detect::{self, Detection, HTTP2_PREFACE};
use libfuzzer_sys::fuzz_target;
use sockmesh_fuzz::{Budget, tls};

/// The longest request line detection waits for (agent/src/detect.rs MAX_REQUEST_LINE).
const MAX_REQUEST_LINE: usize = 8 * 1024;
const MAX_METHOD: usize = 20;

fuzz_target!(|buf: &[u8]| {
    let verdict = detect::detect(buf);
    assert_eq!(
        verdict,
        expected(buf),
        "detect disagrees with the reference"
    );
    assert_eq!(verdict, detect::detect(buf), "detect is not deterministic");

    prefixes_agree(buf, &verdict);

    let undecided = detect::undecided(buf);
    let tls_header =
        buf.first() == Some(&tls::HANDSHAKE) && buf.len() >= 3 && buf[1] == 3 && buf[2] <= 4;
    let want = if tls_header {
        Detection::Tls { sni: None }
    } else {
        Detection::Opaque
    };
    assert_eq!(undecided, want, "undecided");

    assert_eq!(
        detect::is_http2_server_preface(buf),
        is_settings_header(buf),
        "is_http2_server_preface"
    );
});

/// Every decided prefix's verdict is the whole input's (within a cost budget: detection of a
/// prefix reads at most its first line).
fn prefixes_agree(buf: &[u8], full: &Detection) {
    let mut budget = Budget::new(256 * 1024);
    for cut in 1..buf.len() {
        if !budget.spend(cut) {
            break;
        }
        let prefix = detect::detect(&buf[..cut]);
        if prefix != Detection::NeedMore {
            assert_eq!(
                &prefix, full,
                "decided at {cut} bytes, then changed its mind"
            );
        }
    }
}

fn expected(buf: &[u8]) -> Detection {
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    let common = buf.len().min(HTTP2_PREFACE.len());
    if buf[..common] == HTTP2_PREFACE[..common] {
        return if common == HTTP2_PREFACE.len() {
            Detection::Http2
        } else {
            Detection::NeedMore
        };
    }
    if buf[0] == tls::HANDSHAKE {
        return tls::expected(buf);
    }
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end >= MAX_REQUEST_LINE => Detection::Opaque,
        Some(end) => {
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if valid_request_line(line) {
                Detection::Http1
            } else {
                Detection::Opaque
            }
        }
        None if buf.len() >= MAX_REQUEST_LINE => Detection::Opaque,
        None if could_become_request_line(buf) => Detection::NeedMore,
        None => Detection::Opaque,
    }
}

fn method_byte(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

fn target_byte(b: u8) -> bool {
    b > b' ' && b != 0x7f
}

/// `METHOD SP TARGET SP HTTP/1.x` (the CR, if any, already gone).
fn valid_request_line(line: &[u8]) -> bool {
    let Some(space) = line.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (method, rest) = (&line[..space], &line[space + 1..]);
    let Some(space) = rest.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (target, version) = (&rest[..space], &rest[space + 1..]);
    (1..=MAX_METHOD).contains(&method.len())
        && method.iter().all(|&b| method_byte(b))
        && !target.is_empty()
        && target.iter().all(|&b| target_byte(b))
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

/// Whether some continuation of `partial` (no LF in it yet) is a valid request line.
fn could_become_request_line(partial: &[u8]) -> bool {
    let Some(space) = partial.iter().position(|&b| b == b' ') else {
        return partial.len() <= MAX_METHOD && partial.iter().all(|&b| method_byte(b));
    };
    let (method, rest) = (&partial[..space], &partial[space + 1..]);
    if !(1..=MAX_METHOD).contains(&method.len()) || !method.iter().all(|&b| method_byte(b)) {
        return false;
    }
    let Some(space) = rest.iter().position(|&b| b == b' ') else {
        return rest.iter().all(|&b| target_byte(b));
    };
    let (target, version) = (&rest[..space], &rest[space + 1..]);
    if target.is_empty() || !target.iter().all(|&b| target_byte(b)) {
        return false;
    }
    // The version so far, or all of it and the CR of its line end.
    let version = match version.strip_suffix(b"\r") {
        Some(whole) if whole == b"HTTP/1.1" || whole == b"HTTP/1.0" => return true,
        _ => version,
    };
    b"HTTP/1.1".starts_with(version) || b"HTTP/1.0".starts_with(version)
}

/// An HTTP/2 frame header (RFC 9113 4.1): SETTINGS (type 4), flags only ACK, stream 0, a
/// payload of whole 6-byte settings.
fn is_settings_header(buf: &[u8]) -> bool {
    if buf.len() < 9 {
        return false;
    }
    let length = (u32::from(buf[0]) << 16) | (u32::from(buf[1]) << 8) | u32::from(buf[2]);
    let stream = u32::from_be_bytes([buf[5] & 0x7f, buf[6], buf[7], buf[8]]);
    buf[3] == 4 && (buf[4] == 0 || buf[4] == 1) && stream == 0 && length % 6 == 0
}
