//! Request metrics for an HTTP/2 connection whose frames pass through unchanged: each
//! direction's frames are scanned (`frames`) and its header blocks decoded by a mirror HPACK
//! decoder (one per direction, as the receiving endpoint's), so every stream is seen as a
//! request (:method, :authority, :path, content-type) and its response (:status, then
//! grpc-status in trailers or a trailers-only response) without changing a byte.
//!
//! A stream is recorded when its response ends: END_STREAM from the server, or RST_STREAM
//! (broken, if its response had begun). Streams the server never answered are not recorded
//! when they were reset before their response, or above a GOAWAY's last stream id (the
//! client retries those itself, as it would directly), or when the client ended the
//! connection with them open (it gave up on them). When the server ended it first (its end
//! of stream, or a failure reading from or writing to it), a stream it was given and never
//! answered is a failure with no status (`status_code="0"`): its client never gets a response.
//!
//! If a direction cannot be followed (an oversized header block, broken framing, a header
//! block that does not decode), the connection goes on unobserved: its bytes still pass
//! unchanged, its open streams are dropped unrecorded, and it is counted once in
//! `sockmesh_http2_unobserved_total`.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use super::{
    frames::{Event, FrameScanner, ScanError},
    hpack::HpackDecoder,
};
use crate::{
    forward::{
        copy::Peer,
        http::{
            ConnInfo, HttpProxy,
            observe::{ConnRecorder, RequestSummary},
        },
    },
    metrics::http::UnobservedLabels,
};

/// The status recorded for a stream that got no valid response head.
const NO_STATUS: u16 = 0;
/// The HPACK dynamic table size every endpoint starts with (RFC 9113 section 6.5.2).
const DEFAULT_TABLE_SIZE: usize = 4096;
/// The largest table a mirror decoder keeps, whatever an endpoint allows: memory per
/// connection is bounded by it. Larger tables are legal but rare (4 KiB is nearly everyone's).
const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Streams open at once that are followed. Servers allow 100-1000 (SETTINGS_MAX_CONCURRENT_
/// STREAMS); past this the connection goes on unobserved rather than growing without bound.
const MAX_OPEN_STREAMS: usize = 4096;

/// One direction's scanner and the decoder of the header blocks it carries.
struct Side {
    scanner: FrameScanner,
    decoder: HpackDecoder,
    /// The largest table size the receiving endpoint has allowed (its SETTINGS).
    allowed_table: usize,
}

impl Side {
    fn new(scanner: FrameScanner) -> Self {
        Self {
            scanner,
            decoder: HpackDecoder::new(DEFAULT_TABLE_SIZE),
            allowed_table: DEFAULT_TABLE_SIZE,
        }
    }

    /// The receiving endpoint announced `size`: the sender may use up to it, once acked.
    /// Raised only (a lower value takes effect by the size update the sender must send).
    fn allow_table(&mut self, size: u32) {
        let size = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .min(MAX_TABLE_SIZE);
        if size > self.allowed_table {
            self.allowed_table = size;
            self.decoder.allow(size);
        }
    }
}

/// What a request's header block says, in buffers reused from request to request: the
/// thread's, so an idle connection holds none.
#[derive(Default)]
struct RequestFields {
    method: String,
    authority: String,
    host: String,
    path: String,
    grpc: bool,
    /// The fields already taken in this block, by `Self::bit`.
    taken: u8,
}

impl RequestFields {
    fn clear(&mut self) {
        self.method.clear();
        self.authority.clear();
        self.host.clear();
        self.path.clear();
        self.grpc = false;
        self.taken = 0;
    }

    /// The fields whose values are decoded even when not indexed: :path only for the tap.
    fn wanted(name: &[u8], watched: bool) -> bool {
        matches!(name, b":method" | b":authority" | b"host" | b"content-type")
            || (watched && name == b":path")
    }

    /// Keeps the first occurrence of each field and ignores the rest, without looking at
    /// them: a repeated pseudo-header field is malformed anyway (RFC 9113 section 8.3), and a
    /// hostile block of one-byte references to one large table entry (64 KiB of them to a 4
    /// KiB value) must cost neither memory nor a copy per reference.
    fn take(&mut self, name: &[u8], value: &[u8]) {
        let Some(bit) = Self::bit(name) else {
            return;
        };
        if self.taken & bit != 0 {
            return;
        }
        self.taken |= bit;
        let text = || std::str::from_utf8(value).unwrap_or("");
        match name {
            b":method" => self.method.push_str(text()),
            b":authority" => self.authority.push_str(text()),
            b"host" => self.host.push_str(text()),
            b":path" => self.path.push_str(text()),
            _ => self.grpc = value.starts_with(b"application/grpc"),
        }
    }

    fn bit(name: &[u8]) -> Option<u8> {
        Some(match name {
            b":method" => 1,
            b":authority" => 2,
            b"host" => 4,
            b":path" => 8,
            b"content-type" => 16,
            _ => return None,
        })
    }

    /// :authority, else the Host field (RFC 9113 section 8.3.1).
    fn authority(&self) -> &str {
        if self.authority.is_empty() {
            &self.host
        } else {
            &self.authority
        }
    }
}

thread_local! {
    /// Lent to one request header block at a time.
    static REQUEST_FIELDS: RefCell<RequestFields> = RefCell::default();
}

/// What a response's header block (or its trailers) says.
#[derive(Default)]
struct ResponseFields {
    status: Option<u16>,
    grpc_status: Option<String>,
}

struct Stream {
    record: crate::forward::http::observe::ResponseRecord,
    /// Its final response head has come (1xx heads are not final).
    responded: bool,
    grpc_status: Option<String>,
}

/// Everything but the scanners, so that a scanner's events can update it.
struct Streams {
    proxy: Arc<HttpProxy>,
    /// Also the connection's `ConnInfo`, for every metric of it.
    recorder: Arc<ConnRecorder>,
    open: HashMap<u32, Stream>,
    /// The lowest last stream id of the server's GOAWAYs, once it has sent one: streams above
    /// it were never processed.
    last_processed: Option<u32>,
    /// The highest stream id a request was recorded on: a client opens streams in increasing
    /// order (RFC 9113 section 5.1.1), so a header block on one at or below it that is no
    /// longer open is not a request (the trailers of a stream the server already ended).
    newest_request: u32,
}

/// One HTTP/2 connection's observation, fed each direction's bytes as they are read.
pub struct Http2Observer {
    requests: Side,
    responses: Side,
    streams: Streams,
    /// Set once either direction could not be followed.
    unobserved: bool,
    /// Which side ended the connection first, once one has.
    first_to_end: Option<Peer>,
}

impl Http2Observer {
    pub fn new(proxy: Arc<HttpProxy>, conn: ConnInfo) -> Self {
        Self {
            requests: Side::new(FrameScanner::client()),
            responses: Side::new(FrameScanner::server()),
            streams: Streams {
                recorder: ConnRecorder::new(&proxy, conn),
                proxy,
                open: HashMap::new(),
                last_processed: None,
                newest_request: 0,
            },
            unobserved: false,
            first_to_end: None,
        }
    }

    /// The client's next bytes, as they go to the server.
    pub fn client_bytes(&mut self, bytes: &[u8]) {
        if self.unobserved {
            return;
        }
        let (decoder, streams) = (&mut self.requests.decoder, &mut self.streams);
        let responses = &mut self.responses;
        let result = self.requests.scanner.scan(bytes, |event| match event {
            Event::Headers {
                stream,
                push: false,
                block,
                ..
            } => streams.request_headers(stream, decoder, block),
            // A client may not push; its block still updates the server's table.
            Event::Headers { block, .. } => decode(decoder, block, |_| false, |_, _| {}),
            Event::Reset { stream, .. } => {
                streams.reset(stream);
                Ok(())
            }
            // The client's SETTINGS govern the server's encoder.
            Event::Settings {
                header_table_size: Some(size),
            } => {
                responses.allow_table(size);
                Ok(())
            }
            _ => Ok(()),
        });
        if let Err(error) = result {
            self.give_up(&error);
        }
    }

    /// The server's next bytes, as they go to the client.
    pub fn server_bytes(&mut self, bytes: &[u8]) {
        if self.unobserved {
            return;
        }
        let (decoder, streams) = (&mut self.responses.decoder, &mut self.streams);
        let requests = &mut self.requests;
        let result = self.responses.scanner.scan(bytes, |event| match event {
            Event::Headers {
                stream,
                end_stream,
                push,
                block,
            } => {
                let mut fields = ResponseFields::default();
                decode(decoder, block, ResponseFields::wanted, |name, value| {
                    fields.take(name, value)
                })?;
                if !push {
                    streams.response_headers(stream, fields, end_stream);
                }
                Ok(())
            }
            Event::DataEnd { stream } => {
                streams.response_end(stream);
                Ok(())
            }
            Event::Reset { stream, code } => {
                streams.reset_by_server(stream, code);
                Ok(())
            }
            Event::Settings {
                header_table_size: Some(size),
            } => {
                requests.allow_table(size);
                Ok(())
            }
            Event::GoAway { last_stream } => {
                streams.refused_above(last_stream);
                Ok(())
            }
            Event::Settings { .. } => Ok(()),
        });
        if let Err(error) = result {
            self.give_up(&error);
        }
    }

    /// Whether a frame of the agent's may go to the client now: None if never (the
    /// connection is unobserved, or the server has sent its own GOAWAY, whose last stream id
    /// the agent's must not exceed), else whether the server's bytes so far end between two
    /// frames.
    pub fn may_interject(&self) -> Option<bool> {
        if self.unobserved || self.streams.last_processed.is_some() {
            return None;
        }
        Some(self.responses.scanner.at_frame_boundary())
    }

    /// One side of the connection ended (its end of stream, or a failure reading from or
    /// writing to it). If the server ended it first, the streams it was given and never
    /// answered are failures without a status, recorded now: the client's resets of them,
    /// which follow, must not make them look given up.
    pub fn peer_ended(&mut self, peer: Peer) {
        if self.first_to_end.is_some() {
            return;
        }
        self.first_to_end = Some(peer);
        if peer == Peer::Client {
            return;
        }
        let last_processed = self.streams.last_processed.unwrap_or(u32::MAX);
        let unanswered = self
            .streams
            .open
            .extract_if(|&id, stream| !stream.responded && id <= last_processed);
        for (_, stream) in unanswered {
            stream.record.finish_with(NO_STATUS, None, true);
        }
    }

    /// The connection ended: responses cut short are recorded as broken.
    pub fn connection_ended(&mut self) {
        for (_, stream) in self.streams.open.drain() {
            if stream.responded {
                let status = stream.record.status;
                stream.record.finish_with(status, stream.grpc_status, true);
            }
        }
    }

    fn give_up(&mut self, error: &ScanError) {
        let conn = &self.streams.recorder.conn;
        tracing::debug!(id = conn.id, %error, "HTTP/2 connection no longer observed");
        self.unobserved = true;
        self.streams.open.clear();
        let labels = UnobservedLabels {
            direction: conn.direction,
            reason: error.label(),
            workload: conn.workload.clone(),
        };
        let metrics = &self.streams.proxy.metrics.http;
        metrics.http2_unobserved_total.get_or_create(&labels).inc();
    }
}

/// Decodes a header block, handing each field `wanted` by name to `field`.
fn decode(
    decoder: &mut HpackDecoder,
    block: &[u8],
    wanted: impl Fn(&[u8]) -> bool,
    field: impl FnMut(&[u8], &[u8]),
) -> Result<(), ScanError> {
    decoder
        .decode(block, wanted, field)
        .map_err(|_| ScanError::Hpack)
}

/// A response's :status: three digits (RFC 9110 section 15), else none.
fn parse_status(value: &[u8]) -> Option<u16> {
    match value {
        [a, b, c] if value.iter().all(u8::is_ascii_digit) => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// A grpc-status as a metric label: the code when it is a number of up to three digits (gRPC
/// defines 0 to 16), else "invalid", so that a server cannot make a series per response.
fn grpc_status_label(value: &[u8]) -> String {
    if (1..=3).contains(&value.len()) && value.iter().all(u8::is_ascii_digit) {
        String::from_utf8_lossy(value).into_owned()
    } else {
        "invalid".to_string()
    }
}

impl ResponseFields {
    fn wanted(name: &[u8]) -> bool {
        matches!(name, b":status" | b"grpc-status")
    }

    /// The first :status and grpc-status, as for requests (`RequestFields::take`): a
    /// block repeating a reference to a large entry costs no copy per reference.
    fn take(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b":status" if self.status.is_none() => self.status = parse_status(value),
            b"grpc-status" if self.grpc_status.is_none() => {
                self.grpc_status = Some(grpc_status_label(value));
            }
            _ => {}
        }
    }
}

impl Streams {
    /// A client header block: a new stream's request, or trailers of one already open.
    fn request_headers(
        &mut self,
        stream: u32,
        decoder: &mut HpackDecoder,
        block: &[u8],
    ) -> Result<(), ScanError> {
        REQUEST_FIELDS.with(|fields| match fields.try_borrow_mut() {
            Ok(mut fields) => self.request_headers_with(stream, decoder, block, &mut fields),
            Err(_) => {
                let mut fields = RequestFields::default();
                self.request_headers_with(stream, decoder, block, &mut fields)
            }
        })
    }

    fn request_headers_with(
        &mut self,
        stream: u32,
        decoder: &mut HpackDecoder,
        block: &[u8],
        request: &mut RequestFields,
    ) -> Result<(), ScanError> {
        request.clear();
        let watched = self.proxy.tap.is_watched();
        let wanted = |name: &[u8]| RequestFields::wanted(name, watched);
        decode(decoder, block, wanted, |name, value| {
            request.take(name, value)
        })?;
        if self.open.contains_key(&stream) || stream <= self.newest_request {
            return Ok(());
        }
        self.newest_request = stream;
        if self.open.len() >= MAX_OPEN_STREAMS {
            return Err(ScanError::TooManyStreams);
        }
        let raw_authority = request.authority();
        let record = self
            .recorder
            .begin(raw_authority, request.grpc, || RequestSummary {
                method: request.method.clone(),
                authority: raw_authority.to_string(),
                path: request.path.clone(),
            });
        let opened = Stream {
            record,
            responded: false,
            grpc_status: None,
        };
        self.open.insert(stream, opened);
        Ok(())
    }

    /// A server header block: the response head (1xx ones are skipped), or its trailers.
    fn response_headers(&mut self, id: u32, fields: ResponseFields, end_stream: bool) {
        let Some(stream) = self.open.get_mut(&id) else {
            return;
        };
        if let Some(grpc_status) = fields.grpc_status {
            stream.grpc_status = Some(grpc_status);
        }
        if !stream.responded {
            match fields.status {
                Some(100..=199) if !end_stream => return,
                Some(status) => {
                    stream.responded = true;
                    stream.record.response_started(status);
                }
                None => {
                    // A response head without :status is malformed: the stream is broken.
                    if let Some(stream) = self.open.remove(&id) {
                        stream.record.finish_with(NO_STATUS, None, true);
                    }
                    return;
                }
            }
        }
        if end_stream {
            self.response_end(id);
        }
    }

    /// The server's END_STREAM: the response is complete.
    fn response_end(&mut self, id: u32) {
        let Some(stream) = self.open.remove(&id) else {
            return;
        };
        let status = stream.record.status;
        // DATA before any response head is malformed: broken.
        stream
            .record
            .finish_with(status, stream.grpc_status, !stream.responded);
        self.release_if_idle();
    }

    /// With no stream open, the map's buckets go (a stream's entry is large): an idle
    /// connection holds none.
    fn release_if_idle(&mut self) {
        if self.open.is_empty() && self.open.capacity() > 0 {
            self.open = HashMap::new();
        }
    }

    /// RST_STREAM from either side: a response that had begun is broken; a request never
    /// answered is not recorded (the server refused it, or the client gave up on it).
    fn reset(&mut self, id: u32) {
        if let Some(stream) = self.open.remove(&id)
            && stream.responded
        {
            let status = stream.record.status;
            stream.record.finish_with(status, stream.grpc_status, true);
        }
        self.release_if_idle();
    }

    /// The server reset a stream: one it had not answered is a failure without a status
    /// (the client gets no response), unless the code is REFUSED_STREAM, which says it was
    /// never processed (RFC 9113 section 8.7: the client may retry it).
    fn reset_by_server(&mut self, id: u32, code: u32) {
        const REFUSED_STREAM: u32 = 0x7;
        if code != REFUSED_STREAM
            && let Some(stream) = self.open.get(&id)
            && !stream.responded
            && let Some(stream) = self.open.remove(&id)
        {
            stream.record.finish_with(NO_STATUS, None, true);
            self.release_if_idle();
            return;
        }
        self.reset(id);
    }

    /// The server's GOAWAY: streams above `last_stream` were never processed (and those the
    /// client opens before it has read the GOAWAY will not be either).
    fn refused_above(&mut self, last_stream: u32) {
        let last = self
            .last_processed
            .map_or(last_stream, |was| was.min(last_stream));
        self.last_processed = Some(last);
        self.open
            .retain(|&id, stream| id <= last || stream.responded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block of one literal :authority of `len` bytes added to the table, then
    /// `references` one-byte references to it (index 62, the newest dynamic entry).
    fn amplifying_block(len: usize, references: usize) -> Vec<u8> {
        assert!((127..127 + 128 * 128).contains(&len));
        let rest = len - 127;
        let mut block = vec![0x41, 0x7f, 0x80 | (rest & 0x7f) as u8, (rest >> 7) as u8];
        block.extend(std::iter::repeat_n(b'a', len));
        block.extend(std::iter::repeat_n(0xbe, references));
        block
    }

    #[test]
    fn a_request_keeps_one_copy_of_a_field_however_often_it_is_referenced() {
        // 64 KiB of references to a 4,000-byte entry: 240 MB kept when every reference was
        // appended.
        let block = amplifying_block(4000, 60_000);
        let mut decoder = HpackDecoder::new(DEFAULT_TABLE_SIZE);
        let mut request = RequestFields::default();
        let take = |decoder: &mut HpackDecoder, block: &[u8], request: &mut RequestFields| {
            decode(
                decoder,
                block,
                |_| true,
                |name, value| request.take(name, value),
            )
            .unwrap();
        };
        take(&mut decoder, &block, &mut request);
        assert_eq!(request.authority.len(), 4000);
        assert!(request.authority.bytes().all(|byte| byte == b'a'));

        // The next block of the connection starts afresh.
        request.clear();
        let block = [
            0x41, 0x0b, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm',
        ];
        take(&mut decoder, &block, &mut request);
        assert_eq!(request.authority(), "example.com");
    }

    #[test]
    fn a_response_keeps_the_first_status_and_a_bounded_grpc_status() {
        let mut fields = ResponseFields::default();
        fields.take(b":status", b"200");
        fields.take(b":status", b"503");
        fields.take(b"grpc-status", b"14");
        fields.take(b"grpc-status", b"0");
        assert_eq!(fields.status, Some(200));
        assert_eq!(fields.grpc_status.as_deref(), Some("14"));

        assert_eq!(parse_status(b"404"), Some(404));
        for bad in [&b""[..], b"20", b"2000", b"2x0", b"+20", "٢٠٠".as_bytes()] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
        // A server cannot put text of its choosing into a label.
        assert_eq!(grpc_status_label(b"0"), "0");
        assert_eq!(grpc_status_label(b"16"), "16");
        for bad in [&b""[..], b"1234", b"ok", b"\xff", &[b'1'; 4000][..]] {
            assert_eq!(grpc_status_label(bad), "invalid", "{bad:?}");
        }
    }
}
