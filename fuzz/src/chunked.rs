//! Two line-by-line readings of a chunked body (RFC 9112 7.1), to hold the agent's byte-by-byte
//! scanner (`Remaining::take`) against.
//!
//! `lenient` is the agent's documented grammar, exactly: a size line is 1 to 15 hex digits,
//! then optionally `;`, SP or HTAB and anything but CR and LF (extensions are not checked);
//! every line ends in CRLF; a trailer line is anything but CR and LF. `strict` is the RFC's
//! grammar (chunk extensions as tokens and quoted strings, trailer fields as field lines), with
//! the same 15-digit bound on sizes: a body `strict` accepts is one every careful peer accepts.

/// How a body's bytes end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The body ends after `end` bytes; `data` is its chunks' data, concatenated.
    Done { end: usize, data: Vec<u8> },
    /// Every byte fits a body that is not over yet.
    Incomplete,
    /// Some byte cannot be part of a chunked body.
    Invalid,
}

const MAX_SIZE_DIGITS: usize = 15;

/// Where the line starting at `at` ends: Ok(Some(index of its CR)) once its CRLF is there,
/// Ok(None) while neither CR nor LF has come, Err on a bare LF or a CR without its LF.
/// `Err(true)` means "incomplete": the CR is the last byte.
fn line_end(buf: &[u8], at: usize) -> Result<Option<usize>, bool> {
    let Some(offset) = buf[at..].iter().position(|&b| b == b'\r' || b == b'\n') else {
        return Ok(None);
    };
    let cr = at + offset;
    match (buf[cr], buf.get(cr + 1)) {
        (b'\n', _) => Err(false),
        (_, None) => Err(true),
        (_, Some(b'\n')) => Ok(Some(cr)),
        (_, Some(_)) => Err(false),
    }
}

fn hex_digits(line: &[u8]) -> usize {
    line.iter().take_while(|b| b.is_ascii_hexdigit()).count()
}

fn size_of(digits: &[u8]) -> u64 {
    digits.iter().fold(0, |size, &digit| {
        size * 16 + u64::from(char::from(digit).to_digit(16).expect("a hex digit"))
    })
}

/// The agent's grammar.
pub fn lenient(buf: &[u8]) -> Outcome {
    decode(buf, lenient_size_line, |line| !line.is_empty())
}

/// The RFC's grammar.
pub fn strict(buf: &[u8]) -> Outcome {
    decode(buf, strict_size_line, strict_field_line)
}

/// A complete size line (without CRLF) is valid: its size, if so.
fn lenient_size_line(line: &[u8]) -> Option<u64> {
    let digits = hex_digits(line);
    let fine = (1..=MAX_SIZE_DIGITS).contains(&digits)
        && (digits == line.len() || matches!(line[digits], b';' | b' ' | b'\t'));
    fine.then(|| size_of(&line[..digits]))
}

/// Whether a size line without its end yet (no CR or LF in it) can still become valid.
fn lenient_size_prefix(partial: &[u8]) -> bool {
    let digits = hex_digits(partial);
    digits <= MAX_SIZE_DIGITS
        && (digits == partial.len()
            || (digits > 0 && matches!(partial[digits], b';' | b' ' | b'\t')))
}

fn decode(
    buf: &[u8],
    size_line: fn(&[u8]) -> Option<u64>,
    trailer_line: fn(&[u8]) -> bool,
) -> Outcome {
    let mut data = Vec::new();
    let mut at = 0;
    // Chunks, up to the last (size 0).
    loop {
        let cr = match line_end(buf, at) {
            Ok(Some(cr)) => cr,
            // Incomplete: the line so far must still be a viable size line (the agent checks
            // each byte as it comes; `strict` only ever judges whole bodies).
            Ok(None) if lenient_size_prefix(&buf[at..]) => return Outcome::Incomplete,
            Err(true) if size_line(&buf[at..buf.len() - 1]).is_some() => {
                return Outcome::Incomplete;
            }
            _ => return Outcome::Invalid,
        };
        let Some(size) = size_line(&buf[at..cr]) else {
            return Outcome::Invalid;
        };
        at = cr + 2;
        if size == 0 {
            break;
        }
        let Some(chunk) = usize::try_from(size)
            .ok()
            .and_then(|size| buf.get(at..at.checked_add(size)?))
        else {
            return Outcome::Incomplete;
        };
        data.extend_from_slice(chunk);
        at += chunk.len();
        match buf.get(at..at + 2) {
            Some(b"\r\n") => at += 2,
            None if buf[at..] == *b"\r" || at == buf.len() => return Outcome::Incomplete,
            _ => return Outcome::Invalid,
        }
    }
    // Trailer lines, then the empty line.
    loop {
        match line_end(buf, at) {
            Ok(Some(cr)) if cr == at => {
                return Outcome::Done { end: at + 2, data };
            }
            Ok(Some(cr)) if trailer_line(&buf[at..cr]) => at = cr + 2,
            Ok(None) | Err(true) => return Outcome::Incomplete,
            _ => return Outcome::Invalid,
        }
    }
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `1*HEXDIG *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] )`.
fn strict_size_line(line: &[u8]) -> Option<u64> {
    let digits = hex_digits(line);
    if !(1..=MAX_SIZE_DIGITS).contains(&digits) {
        return None;
    }
    let mut rest = &line[digits..];
    let skip_ws = |s: &mut &[u8]| {
        while let [b' ' | b'\t', tail @ ..] = *s {
            *s = tail;
        }
    };
    let token = |s: &mut &[u8]| -> bool {
        let len = s.iter().take_while(|&&b| tchar(b)).count();
        *s = &s[len..];
        len > 0
    };
    loop {
        skip_ws(&mut rest);
        match rest {
            [] => return Some(size_of(&line[..digits])),
            [b';', tail @ ..] => rest = tail,
            _ => return None,
        }
        skip_ws(&mut rest);
        if !token(&mut rest) {
            return None;
        }
        let before_ws = rest;
        skip_ws(&mut rest);
        let [b'=', tail @ ..] = rest else {
            rest = before_ws;
            continue;
        };
        rest = tail;
        skip_ws(&mut rest);
        if let [b'"', tail @ ..] = rest {
            rest = quoted_string_tail(tail)?;
        } else if !token(&mut rest) {
            return None;
        }
    }
}

/// After a quoted-string's opening quote: what follows its closing quote.
fn quoted_string_tail(mut s: &[u8]) -> Option<&[u8]> {
    let qdtext = |b: u8| {
        b == b'\t'
            || b == b' '
            || b == 0x21
            || (0x23..=0x5b).contains(&b)
            || (0x5d..=0x7e).contains(&b)
            || b >= 0x80
    };
    loop {
        match s {
            [b'"', tail @ ..] => return Some(tail),
            [b'\\', escaped, tail @ ..]
                if *escaped == b'\t'
                    || *escaped == b' '
                    || (0x21..=0x7e).contains(escaped)
                    || *escaped >= 0x80 =>
            {
                s = tail
            }
            [b, tail @ ..] if qdtext(*b) => s = tail,
            _ => return None,
        }
    }
}

/// `field-name ":" OWS field-value OWS`.
fn strict_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name.iter().all(|&b| tchar(b))
        && value
            .iter()
            .all(|&b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80)
}
