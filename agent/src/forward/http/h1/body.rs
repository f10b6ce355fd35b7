//! Message bodies: how far a body reaches in the bytes that follow its head. Bodies are
//! forwarded unchanged, so this only finds their end (the chunked coding is scanned, not
//! decoded).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (GET, HEAD responses, 204, 304, Content-Length: 0, ...).
    Empty,
    Length(u64),
    Chunked,
    /// A response without a length: the body ends when the server closes.
    UntilClose,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

/// How much of a body is still to come.
pub enum Remaining {
    Length(u64),
    Chunked(ChunkScanner),
    UntilClose,
}

impl Remaining {
    pub fn of(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Self::Length(0),
            Framing::Length(length) => Self::Length(length),
            Framing::Chunked => Self::Chunked(ChunkScanner::default()),
            Framing::UntilClose => Self::UntilClose,
        }
    }

    /// How many of `bytes` (which follow what was taken before) belong to the body.
    pub fn take(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        match self {
            Self::Length(left) => {
                let taken = (*left).min(bytes.len() as u64);
                *left -= taken;
                Ok(taken as usize)
            }
            Self::Chunked(scanner) => scanner.scan(bytes),
            Self::UntilClose => Ok(bytes.len()),
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            Self::Length(left) => *left == 0,
            Self::Chunked(scanner) => scanner.state == Chunk::Done,
            Self::UntilClose => false,
        }
    }

    /// The sender closing is the body's normal end.
    pub fn ends_at_close(&self) -> bool {
        matches!(self, Self::UntilClose)
    }
}

/// Where a chunked body's scan is (RFC 9112 7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// In the hex chunk size; `digits` so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: extensions or whitespace up to CR.
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Finds the end of a chunked body.
pub struct ChunkScanner {
    state: Chunk,
}

impl Default for ChunkScanner {
    fn default() -> Self {
        Self {
            state: Chunk::Size { size: 0, digits: 0 },
        }
    }
}

impl ChunkScanner {
    /// Consumes body bytes from the front of `bytes`; stops at the body's end.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        let mut at = 0;
        while at < bytes.len() && self.state != Chunk::Done {
            if let Chunk::Data { left } = self.state {
                let taken = left.min((bytes.len() - at) as u64);
                at += taken as usize;
                self.state = if taken == left {
                    Chunk::DataCr
                } else {
                    Chunk::Data { left: left - taken }
                };
                continue;
            }
            self.state = self.step(bytes[at])?;
            at += 1;
        }
        Ok(at)
    }

    fn step(&self, byte: u8) -> Result<Chunk, ChunkError> {
        Ok(match (self.state, byte) {
            (Chunk::Size { size, digits }, _) if byte.is_ascii_hexdigit() => {
                // 15 hex digits keep every size far below u64::MAX.
                if digits >= 15 {
                    return Err(ChunkError);
                }
                let digit = (byte as char).to_digit(16).ok_or(ChunkError)?;
                Chunk::Size {
                    size: size * 16 + u64::from(digit),
                    digits: digits + 1,
                }
            }
            (Chunk::Size { size, digits }, b';' | b' ' | b'\t') if digits > 0 => {
                Chunk::Extension { size }
            }
            (Chunk::Size { size, digits }, b'\r') if digits > 0 => Chunk::SizeLf { size },
            (Chunk::Extension { size }, b'\r') => Chunk::SizeLf { size },
            (Chunk::Extension { .. }, b'\n') => return Err(ChunkError),
            (Chunk::Extension { size }, _) => Chunk::Extension { size },
            (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::TrailerStart,
            (Chunk::SizeLf { size }, b'\n') => Chunk::Data { left: size },
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size { size: 0, digits: 0 },
            (Chunk::TrailerStart, b'\r') => Chunk::FinalLf,
            (Chunk::TrailerLine, b'\r') => Chunk::TrailerLf,
            (Chunk::TrailerStart | Chunk::TrailerLine, b'\n') => return Err(ChunkError),
            (Chunk::TrailerStart | Chunk::TrailerLine, _) => Chunk::TrailerLine,
            (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
            (Chunk::FinalLf, b'\n') => Chunk::Done,
            _ => return Err(ChunkError),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_whole(body: &[u8]) -> Result<usize, ChunkError> {
        let mut remaining = Remaining::of(Framing::Chunked);
        let taken = remaining.take(body)?;
        assert!(remaining.is_done(), "body not finished");
        Ok(taken)
    }

    #[test]
    fn chunked_bodies_end_where_they_should() {
        let body = b"5\r\nhello\r\n1A;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nNEXT";
        assert_eq!(scan_whole(body), Ok(body.len() - 4));
        let with_trailers = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\n";
        assert_eq!(scan_whole(with_trailers), Ok(with_trailers.len()));
    }

    #[test]
    fn chunked_scan_resumes_at_any_split() {
        let body = b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nt: 1\r\n\r\n";
        for split in 0..body.len() {
            let mut remaining = Remaining::of(Framing::Chunked);
            let first = remaining.take(&body[..split]).unwrap();
            assert_eq!(first, split);
            assert!(!remaining.is_done());
            let second = remaining.take(&body[split..]).unwrap();
            assert_eq!(first + second, body.len());
            assert!(remaining.is_done());
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"3\r\nabcX",
            b"1234567890abcdef0\r\n",
            b"0\r\nbad\n",
        ] {
            let mut remaining = Remaining::of(Framing::Chunked);
            assert_eq!(remaining.take(bad), Err(ChunkError), "{bad:?}");
        }
    }

    #[test]
    fn lengths_and_close_delimited() {
        let mut fixed = Remaining::of(Framing::Length(5));
        assert_eq!(fixed.take(b"abc"), Ok(3));
        assert_eq!(fixed.take(b"defgh"), Ok(2));
        assert!(fixed.is_done());
        assert!(Remaining::of(Framing::Empty).is_done());
        let mut until_close = Remaining::of(Framing::UntilClose);
        assert_eq!(until_close.take(b"anything"), Ok(8));
        assert!(!until_close.is_done() && until_close.ends_at_close());
    }
}
