//! HTTP/2 frames as they pass by (RFC 9113 section 4): a scanner fed each chunk of one
//! direction's bytes, in order, that reports what request metrics need. A frame that arrives
//! whole in one chunk is read where it lies; only a frame split across chunks (and a header
//! block split across frames) is copied, and only the part it reads (header blocks,
//! SETTINGS, RST_STREAM, the head of GOAWAY: never DATA), until it is complete. So an idle
//! connection's scanner holds no bytes. The bytes themselves are forwarded unchanged by the
//! caller.

use std::fmt;

/// The client connection preface, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (detection has seen it).
pub const CLIENT_PREFACE_LEN: usize = 24;
const HEAD_LEN: usize = 9;
/// The most of one header block (a HEADERS or PUSH_PROMISE frame with its CONTINUATIONs)
/// kept for decoding, as much as an HTTP/1 head may take. Larger blocks are legal but rare;
/// the connection goes on unobserved (see `ScanError`).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The most of a SETTINGS frame kept (they carry a few 6-byte settings).
const MAX_SETTINGS: usize = 6 * 64;

mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
}

mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;

/// A frame that matters to request metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete header block, padding and priority removed. `push`: a PUSH_PROMISE's (its
    /// block must be decoded to keep the decoder in step, and is otherwise ignored).
    Headers {
        stream: u32,
        end_stream: bool,
        push: bool,
        block: &'a [u8],
    },
    /// DATA that ends its stream.
    DataEnd {
        stream: u32,
    },
    /// RST_STREAM and its error code.
    Reset {
        stream: u32,
        code: u32,
    },
    /// A SETTINGS frame (not an ACK) and the HEADER_TABLE_SIZE it sets, if it does.
    Settings {
        header_table_size: Option<u32>,
    },
    GoAway {
        last_stream: u32,
    },
}

/// Why a direction can no longer be followed. Its bytes are still forwarded unchanged: the
/// endpoints, not the agent, decide what malformed HTTP/2 gets.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanError {
    HeaderBlockTooLarge,
    Malformed(&'static str),
    /// The header block did not decode (reported by the caller's decoder).
    Hpack,
    /// More streams open at once than are followed (reported by the caller).
    TooManyStreams,
}

impl ScanError {
    /// The bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::HeaderBlockTooLarge => "header_block_too_large",
            Self::Malformed(_) => "malformed_frame",
            Self::Hpack => "hpack",
            Self::TooManyStreams => "too_many_streams",
        }
    }
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeaderBlockTooLarge => {
                write!(f, "header block over {MAX_HEADER_BLOCK} bytes")
            }
            Self::Malformed(what) => write!(f, "malformed frame: {what}"),
            Self::Hpack => f.write_str("header block does not decode"),
            Self::TooManyStreams => f.write_str("too many streams open at once"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Head {
    length: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(bytes: &[u8; HEAD_LEN]) -> Self {
        Self {
            length: usize::from(bytes[0]) << 16
                | usize::from(bytes[1]) << 8
                | usize::from(bytes[2]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// How many payload bytes this frame's event needs (the rest is skipped).
    fn kept_len(&self) -> usize {
        match self.kind {
            kind::HEADERS | kind::PUSH_PROMISE | kind::CONTINUATION | kind::SETTINGS => self.length,
            kind::RST_STREAM => self.length.min(4),
            kind::GOAWAY => self.length.min(8),
            _ => 0,
        }
    }
}

/// A header block being assembled from HEADERS (or PUSH_PROMISE) and CONTINUATION frames.
#[derive(Clone, Copy)]
struct Block {
    stream: u32,
    end_stream: bool,
    push: bool,
}

impl Block {
    /// Its event, once all of it is here.
    fn event(self, bytes: &[u8]) -> Event<'_> {
        Event::Headers {
            stream: self.stream,
            end_stream: self.end_stream,
            push: self.push,
            block: bytes,
        }
    }
}

/// One direction of an HTTP/2 connection, scanned frame by frame across reads.
pub struct FrameScanner {
    preface_left: usize,
    head: [u8; HEAD_LEN],
    head_filled: usize,
    /// The frame whose payload is being read across chunks, and how much of it is left.
    frame: Option<(Head, usize)>,
    /// What that frame's event needs of its payload, so far.
    payload: Vec<u8>,
    /// Open while a header block awaits its END_HEADERS; its bytes so far.
    block: Option<Block>,
    block_bytes: Vec<u8>,
    /// A whole frame has been scanned. Nothing may be put in before: a server's first frame
    /// must be its SETTINGS (RFC 9113 section 3.4), and clients treat anything else first as
    /// a connection error.
    framed: bool,
}

impl FrameScanner {
    /// The client's direction: the preface comes first.
    pub fn client() -> Self {
        Self::skipping(CLIENT_PREFACE_LEN)
    }

    /// The server's direction: frames from the first byte (its preface is a SETTINGS frame).
    pub fn server() -> Self {
        Self::skipping(0)
    }

    fn skipping(preface_left: usize) -> Self {
        Self {
            preface_left,
            head: [0; HEAD_LEN],
            head_filled: 0,
            frame: None,
            payload: Vec::new(),
            block: None,
            block_bytes: Vec::new(),
            framed: false,
        }
    }

    /// Whether the bytes so far end between two frames, outside any header block: where a
    /// frame may be put in.
    pub fn at_frame_boundary(&self) -> bool {
        self.framed
            && self.preface_left == 0
            && self.head_filled == 0
            && self.frame.is_none()
            && self.block.is_none()
    }

    /// Scans the next bytes of this direction, calling `on_event` for each frame that
    /// matters as it completes. After an error the scanner must not be fed again.
    pub fn scan(
        &mut self,
        mut bytes: &[u8],
        mut on_event: impl FnMut(Event<'_>) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        let preface = self.preface_left.min(bytes.len());
        self.preface_left -= preface;
        bytes = &bytes[preface..];
        while !bytes.is_empty() {
            match self.frame {
                None => {
                    let take = (HEAD_LEN - self.head_filled).min(bytes.len());
                    self.head[self.head_filled..self.head_filled + take]
                        .copy_from_slice(&bytes[..take]);
                    self.head_filled += take;
                    bytes = &bytes[take..];
                    if self.head_filled == HEAD_LEN {
                        self.head_filled = 0;
                        let head = Head::parse(&self.head);
                        self.begin_frame(head)?;
                        if bytes.len() >= head.length {
                            // The whole payload is here: read in place, nothing kept.
                            let (payload, rest) = bytes.split_at(head.length);
                            bytes = rest;
                            self.end_frame(head, &payload[..head.kept_len()], &mut on_event)?;
                        } else {
                            self.frame = Some((head, head.length));
                        }
                    }
                }
                Some((head, left)) => {
                    let take = left.min(bytes.len());
                    let kept_from = head.length - left;
                    let keep = head.kept_len().saturating_sub(kept_from).min(take);
                    self.payload.extend_from_slice(&bytes[..keep]);
                    bytes = &bytes[take..];
                    if take == left {
                        self.frame = None;
                        // Released with the frame: idle connections keep no buffer.
                        let payload = std::mem::take(&mut self.payload);
                        self.end_frame(head, &payload, &mut on_event)?;
                    } else {
                        self.frame = Some((head, left - take));
                    }
                }
            }
        }
        Ok(())
    }

    fn begin_frame(&mut self, head: Head) -> Result<(), ScanError> {
        let continuing = self.block.as_ref().map(|block| block.stream);
        match (continuing, head.kind) {
            (Some(stream), kind::CONTINUATION) if stream == head.stream => {}
            (Some(_), _) => return Err(ScanError::Malformed("header block interrupted")),
            (None, kind::CONTINUATION) => {
                return Err(ScanError::Malformed("CONTINUATION without a header block"));
            }
            (None, _) => {}
        }
        let limit = match head.kind {
            kind::SETTINGS => MAX_SETTINGS,
            _ => MAX_HEADER_BLOCK,
        };
        if head.kept_len() > limit {
            return Err(match head.kind {
                kind::SETTINGS => ScanError::Malformed("SETTINGS too long"),
                _ => ScanError::HeaderBlockTooLarge,
            });
        }
        Ok(())
    }

    /// A frame is complete; `payload` is the part of it its event needs (`Head::kept_len`).
    fn end_frame(
        &mut self,
        head: Head,
        payload: &[u8],
        on_event: &mut impl FnMut(Event<'_>) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.framed = true;
        let stream = head.stream;
        match head.kind {
            kind::DATA if head.has(flag::END_STREAM) => on_event(Event::DataEnd { stream }),
            kind::HEADERS | kind::PUSH_PROMISE => {
                let push = head.kind == kind::PUSH_PROMISE;
                let fragment = header_fragment(payload, head, push)?;
                let block = Block {
                    stream,
                    end_stream: !push && head.has(flag::END_STREAM),
                    push,
                };
                if head.has(flag::END_HEADERS) {
                    // The whole block in one frame (nearly always): decoded where it lies.
                    return on_event(block.event(fragment));
                }
                self.block_bytes.clear();
                self.block_bytes.extend_from_slice(fragment);
                self.block = Some(block);
                Ok(())
            }
            kind::CONTINUATION => {
                if self.block_bytes.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(ScanError::HeaderBlockTooLarge);
                }
                self.block_bytes.extend_from_slice(payload);
                if !head.has(flag::END_HEADERS) {
                    return Ok(());
                }
                let Some(block) = self.block.take() else {
                    return Ok(());
                };
                // Released with the block: idle connections keep no buffer.
                let bytes = std::mem::take(&mut self.block_bytes);
                on_event(block.event(&bytes))
            }
            kind::RST_STREAM if payload.len() == 4 => on_event(Event::Reset {
                stream,
                code: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
            }),
            kind::RST_STREAM => Err(ScanError::Malformed("RST_STREAM length")),
            kind::SETTINGS if head.has(flag::ACK) => Ok(()),
            kind::SETTINGS => {
                let header_table_size = settings_header_table_size(payload)?;
                on_event(Event::Settings { header_table_size })
            }
            kind::GOAWAY if payload.len() == 8 => {
                let id = [payload[0], payload[1], payload[2], payload[3]];
                let last_stream = u32::from_be_bytes(id) & 0x7fff_ffff;
                on_event(Event::GoAway { last_stream })
            }
            kind::GOAWAY => Err(ScanError::Malformed("GOAWAY length")),
            _ => Ok(()),
        }
    }
}

/// A HEADERS or PUSH_PROMISE payload without its pad length, priority or promised stream id,
/// and without its padding.
fn header_fragment(payload: &[u8], head: Head, push: bool) -> Result<&[u8], ScanError> {
    let mut rest = payload;
    let mut padding = 0;
    if head.has(flag::PADDED) {
        let (&pad, after) = rest
            .split_first()
            .ok_or(ScanError::Malformed("padded frame without its pad length"))?;
        padding = usize::from(pad);
        rest = after;
    }
    let skip = if push {
        4
    } else if head.has(flag::PRIORITY) {
        5
    } else {
        0
    };
    if rest.len() < skip + padding {
        return Err(ScanError::Malformed("padding longer than the frame"));
    }
    Ok(&rest[skip..rest.len() - padding])
}

/// The HEADER_TABLE_SIZE a SETTINGS payload sets (the last one, if it repeats).
fn settings_header_table_size(payload: &[u8]) -> Result<Option<u32>, ScanError> {
    if !payload.len().is_multiple_of(6) {
        return Err(ScanError::Malformed("SETTINGS length"));
    }
    Ok(payload
        .chunks_exact(6)
        .filter(|setting| {
            u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_HEADER_TABLE_SIZE
        })
        .map(|setting| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
        .next_back())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One frame's bytes.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Headers(u32, bool, bool, Vec<u8>),
        DataEnd(u32),
        Reset(u32),
        Settings(Option<u32>),
        GoAway(u32),
    }

    fn scan_in_pieces(scanner: &mut FrameScanner, bytes: &[u8], piece: usize) -> Vec<Owned> {
        let mut events = Vec::new();
        for chunk in bytes.chunks(piece) {
            scanner
                .scan(chunk, |event| {
                    events.push(match event {
                        Event::Headers {
                            stream,
                            end_stream,
                            push,
                            block,
                        } => Owned::Headers(stream, end_stream, push, block.to_vec()),
                        Event::DataEnd { stream } => Owned::DataEnd(stream),
                        Event::Reset { stream, .. } => Owned::Reset(stream),
                        Event::Settings { header_table_size } => Owned::Settings(header_table_size),
                        Event::GoAway { last_stream } => Owned::GoAway(last_stream),
                    });
                    Ok(())
                })
                .unwrap();
        }
        events
    }

    #[test]
    fn nothing_goes_in_before_the_servers_first_frame_is_whole() {
        let mut scanner = FrameScanner::server();
        assert!(!scanner.at_frame_boundary(), "before any byte");
        let settings = frame(kind::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
        scan_in_pieces(&mut scanner, &settings[..5], 5);
        assert!(!scanner.at_frame_boundary(), "inside the SETTINGS head");
        scan_in_pieces(&mut scanner, &settings[5..12], 7);
        assert!(!scanner.at_frame_boundary(), "inside the SETTINGS payload");
        scan_in_pieces(&mut scanner, &settings[12..], 3);
        assert!(scanner.at_frame_boundary(), "after the SETTINGS");
    }

    fn conversation() -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut settings = vec![0, 1, 0, 0, 0x10, 0];
        settings.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        bytes.extend(frame(kind::SETTINGS, 0, 0, &settings));
        bytes.extend(frame(kind::SETTINGS, flag::ACK, 0, &[]));
        // HEADERS, padded and with priority, continued once.
        let mut headers = vec![3];
        headers.extend_from_slice(&[0, 0, 0, 0, 16]);
        headers.extend_from_slice(b"abc");
        headers.extend_from_slice(&[0, 0, 0]);
        bytes.extend(frame(
            kind::HEADERS,
            flag::PADDED | flag::PRIORITY,
            1,
            &headers,
        ));
        bytes.extend(frame(kind::CONTINUATION, flag::END_HEADERS, 1, b"def"));
        bytes.extend(frame(kind::DATA, 0, 1, &[7; 100]));
        bytes.extend(frame(kind::DATA, flag::END_STREAM, 1, &[7; 10]));
        bytes.extend(frame(
            kind::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            3,
            b"x",
        ));
        bytes.extend(frame(
            kind::PUSH_PROMISE,
            flag::END_HEADERS,
            3,
            b"\0\0\0\x02pp",
        ));
        bytes.extend(frame(kind::RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        bytes.extend(frame(0x6, 0, 0, &[1; 8])); // PING: skipped
        bytes.extend(frame(kind::GOAWAY, 0, 0, b"\0\0\0\x05\0\0\0\0debug data"));
        bytes
    }

    #[test]
    fn events_are_the_same_however_the_bytes_are_cut() {
        let bytes = conversation();
        let expected = vec![
            Owned::Settings(Some(4096)),
            Owned::Headers(1, false, false, b"abcdef".to_vec()),
            Owned::DataEnd(1),
            Owned::Headers(3, true, false, b"x".to_vec()),
            Owned::Headers(3, false, true, b"pp".to_vec()),
            Owned::Reset(3),
            Owned::GoAway(5),
        ];
        for piece in [1, 2, 7, 9, 10, 64, bytes.len()] {
            let events = scan_in_pieces(&mut FrameScanner::client(), &bytes, piece);
            assert_eq!(events, expected, "in pieces of {piece}");
        }
    }

    fn first_error(bytes: &[u8]) -> ScanError {
        FrameScanner::server()
            .scan(bytes, |_| Ok(()))
            .expect_err("an error")
    }

    #[test]
    fn broken_framing_is_an_error_not_a_panic() {
        let interrupted = [
            frame(kind::HEADERS, 0, 1, b"ab"),
            frame(kind::DATA, 0, 1, b"cd"),
        ]
        .concat();
        assert_eq!(
            first_error(&interrupted),
            ScanError::Malformed("header block interrupted")
        );
        let stray = frame(kind::CONTINUATION, flag::END_HEADERS, 1, b"ab");
        assert!(matches!(first_error(&stray), ScanError::Malformed(_)));
        let overpadded = frame(
            kind::HEADERS,
            flag::PADDED | flag::END_HEADERS,
            1,
            &[9, 1, 2],
        );
        assert!(matches!(first_error(&overpadded), ScanError::Malformed(_)));
        let empty_padded = frame(kind::HEADERS, flag::PADDED | flag::END_HEADERS, 1, &[]);
        assert!(matches!(
            first_error(&empty_padded),
            ScanError::Malformed(_)
        ));
        let settings = frame(kind::SETTINGS, 0, 0, &[0; 7]);
        assert!(matches!(first_error(&settings), ScanError::Malformed(_)));
        let reset = frame(kind::RST_STREAM, 0, 1, &[0; 3]);
        assert!(matches!(first_error(&reset), ScanError::Malformed(_)));
        let goaway = frame(kind::GOAWAY, 0, 0, &[0; 7]);
        assert!(matches!(first_error(&goaway), ScanError::Malformed(_)));
    }

    #[test]
    fn header_blocks_are_bounded() {
        let mut head = frame(kind::HEADERS, 0, 1, &[]);
        let too_long = MAX_HEADER_BLOCK + 1;
        head[..3].copy_from_slice(&[
            (too_long >> 16) as u8,
            (too_long >> 8) as u8,
            too_long as u8,
        ]);
        assert_eq!(first_error(&head), ScanError::HeaderBlockTooLarge);

        let half = vec![0; MAX_HEADER_BLOCK / 2 + 1];
        let continued = [
            frame(kind::HEADERS, 0, 1, &half),
            frame(kind::CONTINUATION, 0, 1, &half),
        ]
        .concat();
        assert_eq!(first_error(&continued), ScanError::HeaderBlockTooLarge);
    }

    #[test]
    fn large_data_frames_are_skipped_not_kept() {
        let mut scanner = FrameScanner::server();
        let data = frame(kind::DATA, flag::END_STREAM, 1, &vec![0; 1 << 20]);
        let events = scan_in_pieces(&mut scanner, &data, 64 * 1024);
        assert_eq!(events, vec![Owned::DataEnd(1)]);
        assert!(scanner.payload.capacity() < 1024, "DATA was not kept");
    }
}
