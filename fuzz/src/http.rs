//! References for the HTTP/1 head targets: the documented rules of `agent::fuzzing`'s head
//! parser, written again from httparse's view of the head (RFC 9110, RFC 9112).

use agent::fuzzing::Framing;

/// The header count the agent allows (as hyper does); more is "too large".
pub const MAX_HEADERS: usize = 100;

/// A Content-Length value: a list of equal runs of 1 to 19 digits (no body is 10^19 bytes
/// long; longer runs are refused, leading zeros or not). None when invalid.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let mut seen: Option<u64> = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let length = part
            .iter()
            .fold(0u64, |length, digit| length * 10 + u64::from(digit - b'0'));
        if seen.is_some_and(|seen| seen != length) {
            return None;
        }
        seen = Some(length);
    }
    seen
}

/// What the framing headers say, before the request/response rules apply.
#[derive(Debug, Default)]
pub struct FramingFields {
    /// Some(length) if Content-Length was given (and every one was valid and equal).
    pub content_length: Option<u64>,
    /// A Content-Length was invalid, or two disagree.
    pub bad_length: bool,
    pub transfer_encoding: bool,
    /// Transfer-Encoding's value was not UTF-8.
    pub bad_coding: bool,
    /// The last transfer coding named in all Transfer-Encoding fields is `chunked`.
    pub chunked_last: bool,
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// The first Host field whose value is UTF-8.
    pub host: Option<String>,
    /// Host fields, all of them.
    pub host_fields: usize,
}

impl FramingFields {
    pub fn of(headers: &[httparse::Header<'_>]) -> Self {
        let mut fields = Self::default();
        let mut codings: Vec<String> = Vec::new();
        for header in headers {
            let name = header.name.to_ascii_lowercase();
            match name.as_str() {
                "content-length" => match content_length(header.value) {
                    Some(length) if fields.content_length.is_none_or(|seen| seen == length) => {
                        fields.content_length = Some(length);
                    }
                    _ => fields.bad_length = true,
                },
                "transfer-encoding" => {
                    fields.transfer_encoding = true;
                    match std::str::from_utf8(header.value) {
                        Ok(value) => codings.extend(
                            value
                                .split(',')
                                // Optional whitespace: SP and HTAB (RFC 9110 5.6.3).
                                .map(|coding| coding.trim_matches([' ', '\t']).to_ascii_lowercase())
                                .filter(|coding| !coding.is_empty()),
                        ),
                        Err(_) => fields.bad_coding = true,
                    }
                }
                "connection" => {
                    for option in header.value.split(|&b| b == b',') {
                        let option = option.trim_ascii().to_ascii_lowercase();
                        fields.close |= option == b"close";
                        fields.keep_alive |= option == b"keep-alive";
                    }
                }
                "upgrade" => fields.upgrade = true,
                "host" => {
                    fields.host_fields += 1;
                    if fields.host.is_none() {
                        fields.host = std::str::from_utf8(header.value).ok().map(str::to_string);
                    }
                }
                _ => {}
            }
        }
        fields.chunked_last = codings.last().is_some_and(|last| last == "chunked");
        fields
    }

    pub fn keep_alive(&self, minor_version: u8) -> bool {
        !self.close && (minor_version == 1 || self.keep_alive)
    }

    /// A request's body (RFC 9112 6.1-6.3, refusing everything ambiguous); None = refused.
    pub fn request_framing(&self, minor_version: u8) -> Option<Framing> {
        if self.bad_length || self.bad_coding {
            return None;
        }
        if self.transfer_encoding {
            // Only chunked last, never with a length, never in HTTP/1.0.
            let fine = self.chunked_last && self.content_length.is_none() && minor_version == 1;
            return fine.then_some(Framing::Chunked);
        }
        Some(match self.content_length {
            None | Some(0) => Framing::Empty,
            Some(length) => Framing::Length(length),
        })
    }
}

/// hyper's reading of "is the body chunked": the last coding of the last Transfer-Encoding
/// field, an empty element included. RFC 9110 5.6.1 says to ignore empty list elements, as
/// the agent does, so `chunked,` (or `chunked` then an empty field) is chunked to the agent
/// and not to hyper: the differential checks skip those.
pub fn hyper_sees_chunked(headers: &[httparse::Header<'_>]) -> bool {
    headers
        .iter()
        .rev()
        .find(|header| header.name.eq_ignore_ascii_case("transfer-encoding"))
        .and_then(|header| std::str::from_utf8(header.value).ok())
        .and_then(|value| value.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}
