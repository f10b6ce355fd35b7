//! The /tap filter, from the query string of an admin request (`agent::tap::TapFilter::parse`).
//! /tap is served to loopback clients only, but any local process is one.
//!
//! Asserts, for any query string:
//! - parsing never panics, and an accepted filter has its authority lowercased and its method
//!   uppercased;
//! - written back as a query (every byte percent-encoded), it parses to the same filter;
//! - a value's percent-decoding agrees with a reference (`%` and two hex digits is a byte,
//!   `+` a space, the result UTF-8; anything else after `%` is an error).
#![no_main]

use std::fmt::Write as _;

use agent::tap::TapFilter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(query) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(filter) = TapFilter::parse(query) {
        if let Some(authority) = &filter.authority {
            assert_eq!(authority, &authority.to_ascii_lowercase());
        }
        if let Some(method) = &filter.method {
            assert_eq!(method, &method.to_ascii_uppercase());
        }
        let written = write(&filter);
        assert_eq!(TapFilter::parse(&written), Ok(filter), "{written:?}");
    }

    // The whole input as one value.
    let value = query.replace('&', "");
    let parsed = TapFilter::parse(&format!("path_prefix={value}")).map(|f| f.path_prefix);
    assert_eq!(parsed.ok(), decode(&value).map(Some), "value {value:?}");
});

fn encode(value: &str) -> String {
    value.bytes().fold(String::new(), |mut out, b| {
        let _ = write!(out, "%{b:02X}");
        out
    })
}

fn write(filter: &TapFilter) -> String {
    let mut pairs = Vec::new();
    if let Some(port) = filter.port {
        pairs.push(format!("port={port}"));
    }
    for (key, value) in [
        ("authority", &filter.authority),
        ("path_prefix", &filter.path_prefix),
        ("method", &filter.method),
    ] {
        if let Some(value) = value {
            pairs.push(format!("{key}={}", encode(value)));
        }
    }
    pairs.join("&")
}

fn decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' => {
                let digits = bytes.get(at + 1..at + 3)?;
                if !digits.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let digit = |b: u8| char::from(b).to_digit(16).expect("hex") as u8;
                out.push(digit(digits[0]) * 16 + digit(digits[1]));
                at += 3;
            }
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}
