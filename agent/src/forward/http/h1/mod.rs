//! HTTP/1 forwarding without re-encoding. Each request head is parsed (httparse) for what the
//! metrics and the tap need and for its framing, then its bytes go to the upstream unchanged,
//! followed by its body; the response comes back the same way. Nothing is decoded or rebuilt,
//! so a request costs one read and one write each way, and the client sees the server's bytes.
//!
//! One upstream connection per client connection, re-opened when the server closed it between
//! requests. Request body and response run concurrently (a server may answer early, or send
//! 100 Continue before the body). Upgrades (101) and CONNECT (2xx) continue as a byte tunnel.
//! The proxy answers itself only when it must: 400 (or 431) for a request it cannot frame, 408
//! for a head that does not arrive whole within the detection timeout, 502
//! when the upstream is unreachable or its response is malformed, 504 when the response head
//! takes longer than the upstream timeout. Framing it cannot trust (Content-Length with
//! Transfer-Encoding, conflicting lengths) is refused rather than guessed, so no request can
//! be smuggled past the proxy.

pub(crate) mod body;
pub(crate) mod head;
mod upstream;

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use self::{
    body::{ChunkError, Framing, Remaining},
    head::{HeadError, RequestHead, ResponseHead},
    upstream::Upstream,
};
use super::{
    ConnInfo, HttpProxy,
    observe::{ConnRecorder, ResponseRecord},
};
use crate::forward::{ByteCounters, io::Counted};

/// Read size while waiting for a head; bodies read in larger pieces.
const HEAD_READ: usize = 8 * 1024;
const BODY_READ: usize = 64 * 1024;

/// Proxies HTTP/1 between `client` and its original destination (`upstream`: the connection
/// opened at accept and the connection's byte counters), or answers 502 to an HTTP client
/// whose upstream is unreachable (`upstream` None).
///
/// Not an `async fn`: its future would keep the arguments beside the session made of them
/// (rustc lays out an async fn's arguments apart from its locals), about 190 bytes more for
/// every HTTP/1 connection for its whole life.
pub fn forward(
    client: TcpStream,
    upstream: Option<(TcpStream, ByteCounters)>,
    conn: ConnInfo,
    proxy: Arc<HttpProxy>,
) -> impl Future<Output = io::Result<()>> {
    let mut session = Session {
        client,
        client_buf: BytesMut::new(),
        upstream: upstream.map(|(stream, counters)| Upstream {
            stream: Some(stream),
            buf: BytesMut::new(),
            counters,
            reused: false,
            used: false,
        }),
        conn,
        recorder: None,
        proxy,
    };
    async move {
        match session.run().await {
            // A peer closing in the middle of a message is not a socket error.
            Err(error) if error.kind() != io::ErrorKind::UnexpectedEof => Err(error),
            _ => {
                // A clean end: FIN to the client after the last response.
                let _ = session.client.shutdown().await;
                Ok(())
            }
        }
    }
}

struct Session {
    client: TcpStream,
    /// Bytes read from the client and not forwarded yet (a head being parsed, the next
    /// pipelined request).
    client_buf: BytesMut,
    /// None: the original destination is unreachable.
    upstream: Option<Upstream>,
    conn: ConnInfo,
    /// Made at the first request: a connection that never sends one holds none.
    recorder: Option<Arc<ConnRecorder>>,
    proxy: Arc<HttpProxy>,
}

/// What happens after an exchange.
enum Next {
    KeepAlive,
    Close,
    Tunnel,
}

/// Why an exchange failed.
#[derive(Debug)]
enum Failure {
    /// The client went away or failed: nobody to answer.
    Client(io::Error),
    /// The request body is not valid chunked coding.
    BadRequestBody,
    /// The upstream failed (connect, I/O, closed early).
    Upstream(io::Error),
    BadResponse,
    Timeout,
}

impl Session {
    async fn run(&mut self) -> io::Result<()> {
        loop {
            let request = match self.next_request().await {
                Ok(Some(request)) => request,
                Ok(None) => return Ok(()),
                Err(RequestError::Io(error)) => return Err(error),
                Err(RequestError::Timeout) => {
                    // Apart from malformed heads: a slow-loris client shows up as these.
                    self.proxy.count_error(&self.conn, "head_timeout");
                    return Box::pin(self.write_local(408)).await;
                }
                Err(RequestError::Head(error)) => {
                    tracing::debug!(%error, "malformed request");
                    self.proxy.count_error(&self.conn, "bad_request");
                    let status = if error == HeadError::TooLarge {
                        431
                    } else {
                        400
                    };
                    return Box::pin(self.write_local(status)).await;
                }
            };
            // Boxed, with the request head, so that the exchange's state (timers, both
            // directions' I/O) is allocated per request instead of held by every idle
            // keep-alive connection; so are the local answers above (rare, and a timer each).
            match Box::pin(self.exchange_owned(request)).await? {
                Next::KeepAlive if !self.proxy.draining.is_cancelled() => {}
                Next::KeepAlive | Next::Close => return Ok(()),
                // Boxed: upgrades are rare, and the tunnel's copy would size every HTTP/1
                // connection's task, idle keep-alive ones included.
                Next::Tunnel => return Box::pin(self.tunnel()).await,
            }
        }
    }

    /// The next request head, or None when the client ends the connection between requests
    /// (or the agent drains while it is idle).
    async fn next_request(&mut self) -> Result<Option<RequestHead>, RequestError> {
        // The whole head must arrive within the head timeout of its first byte: a deadline,
        // not a timeout per read, or a client dripping one line at a time would hold the
        // connection (and its upstream) for ever.
        let mut deadline = None;
        // How much of the buffer the last parse saw: a head can only complete (or outgrow
        // its limit) with a line's end or more bytes than the limit, so reads without either
        // are not parsed again (a head sent a byte at a time was parsed whole per byte).
        let mut parsed = 0;
        loop {
            if !self.client_buf.is_empty() {
                let new = &self.client_buf[parsed.min(self.client_buf.len())..];
                if new.contains(&b'\n') || self.client_buf.len() >= head::MAX_HEAD_BYTES {
                    if let Some(request) = head::parse_request(&self.client_buf)? {
                        return Ok(Some(request));
                    }
                    parsed = self.client_buf.len();
                }
                deadline.get_or_insert_with(|| Instant::now() + self.proxy.head_timeout);
            }
            let read = if self.client_buf.is_empty() {
                // Idle between requests: wait without holding a buffer, and untimed (a
                // keep-alive connection may stay idle as long as it likes).
                tokio::select! {
                    biased;
                    ready = self.client.readable() => ready?,
                    () = self.proxy.draining.cancelled() => return Ok(None),
                }
                fill(&mut self.client, &mut self.client_buf, HEAD_READ).await?
            } else {
                // A head that has begun must finish by its deadline.
                let more = fill(&mut self.client, &mut self.client_buf, HEAD_READ);
                let deadline = deadline.unwrap_or_else(|| Instant::now() + self.proxy.head_timeout);
                tokio::time::timeout_at(deadline, more)
                    .await
                    .map_err(|_| RequestError::Timeout)??
            };
            if read == 0 {
                // An unfinished head at EOF has no one left to answer.
                return Ok(None);
            }
        }
    }

    /// `exchange`, owning its request head (which then lives in the exchange's box).
    async fn exchange_owned(&mut self, request: RequestHead) -> io::Result<Next> {
        self.exchange(&request).await
    }

    /// One request and its response.
    async fn exchange(&mut self, request: &RequestHead) -> io::Result<Next> {
        let mut record = self.begin_record(request);
        let Some(upstream) = self.upstream.as_mut() else {
            self.proxy.count_error(&self.conn, "upstream_unavailable");
            record.answered_locally(502);
            self.write_local(502).await?;
            return Ok(Next::Close);
        };
        let response = upstream::ResponseProgress::default();
        let mut retried = false;
        let response = loop {
            let result = upstream
                .exchange(
                    &mut self.client,
                    &mut self.client_buf,
                    request,
                    &mut record,
                    &response,
                    &self.proxy,
                    &self.conn,
                )
                .await;
            match result {
                Ok(head) => break head,
                // A reused connection the server closed just as the request went out (an idle
                // timeout racing us): nothing was answered, so an idempotent request without a
                // body is sent once more, on a fresh connection.
                Err(Failure::Upstream(error))
                    if !retried
                        && upstream.reused
                        && request.is_retryable()
                        && upstream.buf.is_empty()
                        && !response.started.load(Ordering::Relaxed) =>
                {
                    tracing::debug!(%error, "reused upstream connection was closed; retrying");
                    upstream.stream = None;
                    retried = true;
                }
                Err(failure) => {
                    upstream.stream = None;
                    return self.failed(failure, record, &response).await;
                }
            }
        };
        if request.framing == Framing::Empty {
            self.client_buf.advance(request.len);
        }
        record.finish(response.status, false);
        if response.tunnel {
            return Ok(Next::Tunnel);
        }
        if !response.keep_alive {
            upstream.stream = None;
        }
        release_idle_buffer(&mut upstream.buf);
        release_idle_buffer(&mut self.client_buf);
        Ok(if request.keep_alive && response.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        })
    }

    /// Answers a failed exchange if its response had not begun; the connection closes.
    async fn failed(
        &mut self,
        failure: Failure,
        record: ResponseRecord,
        response: &upstream::ResponseProgress,
    ) -> io::Result<Next> {
        let response_started = response.started.load(Ordering::Relaxed);
        tracing::debug!(?failure, response_started, "http/1 exchange failed");
        if response.complete.load(Ordering::Relaxed) {
            // The whole response reached the client (an early 413, or a 417 for a client that
            // then sends no body): the request side's failure does not make it a failed one.
            let status = record.status;
            record.finish(status, false);
            return Ok(Next::Close);
        }
        if response_started {
            let status = record.status;
            record.finish(status, true);
            return match failure {
                Failure::Client(error) | Failure::Upstream(error) => Err(error),
                _ => Ok(Next::Close),
            };
        }
        let (status, reason) = match failure {
            Failure::Client(error) => return Err(error),
            Failure::BadRequestBody => (400, "bad_request"),
            Failure::Upstream(_) | Failure::BadResponse => (502, "upstream_unavailable"),
            Failure::Timeout => (504, "upstream_timeout"),
        };
        self.proxy.count_error(&self.conn, reason);
        record.answered_locally(status);
        self.write_local(status).await?;
        Ok(Next::Close)
    }

    fn begin_record(&mut self, request: &RequestHead) -> ResponseRecord {
        let (proxy, conn) = (&self.proxy, &self.conn);
        self.recorder
            .get_or_insert_with(|| ConnRecorder::new(proxy, conn.clone()))
            .begin(&request.authority, false, || {
                super::observe::RequestSummary {
                    method: request.method.clone(),
                    authority: request.authority.clone(),
                    path: request.path().to_string(),
                }
            })
    }

    /// A response the proxy makes itself; the connection closes after it.
    async fn write_local(&mut self, status: u16) -> io::Result<()> {
        let reason = hyper::StatusCode::from_u16(status)
            .ok()
            .and_then(|status| status.canonical_reason())
            .unwrap_or("");
        let body = format!("{status} {reason}\n");
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        self.client.write_all(response.as_bytes()).await?;
        self.linger().await;
        Ok(())
    }

    /// Closes after a local answer without losing it: closing a socket with unread input
    /// sends a reset, which can destroy the answer before the client reads it. So the write
    /// side closes first and what the client still sends is read and dropped, briefly.
    async fn linger(&mut self) {
        const LINGER: Duration = Duration::from_secs(1);
        const LINGER_BYTES: usize = 256 * 1024;
        if self.client.shutdown().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(LINGER, async {
            let mut discarded = 0;
            // On the heap: an array here would make every connection's future 4 KiB larger.
            let mut scratch = vec![0u8; 4096];
            while discarded < LINGER_BYTES {
                match self.client.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => discarded += read,
                }
            }
        })
        .await;
    }

    /// After a 101 or a successful CONNECT: raw bytes both ways until either side ends.
    async fn tunnel(&mut self) -> io::Result<()> {
        let Some(Upstream {
            stream: Some(server),
            buf: server_buf,
            counters,
            ..
        }) = self.upstream.as_mut()
        else {
            return Ok(());
        };
        let mut server = Counted::new(server, counters.clone());
        // Whatever either side sent right after the heads is the tunnel's first bytes.
        server.write_all(&self.client_buf).await?;
        self.client.write_all(server_buf).await?;
        counters.server_to_client(server_buf.len() as u64);
        self.client_buf.clear();
        server_buf.clear();
        tokio::io::copy_bidirectional(&mut self.client, &mut server).await?;
        Ok(())
    }
}

enum MessageError {
    Read(io::Error),
    Write(io::Error),
    /// The sender closed before the body ended.
    Truncated(io::Error),
    Body(ChunkError),
}

/// Whose message was being forwarded.
#[derive(Clone, Copy)]
enum Sender {
    Client,
    Server,
}

impl MessageError {
    /// What the exchange failed of: reading (or a cut-off or malformed body) fails on the
    /// sender's side, writing on the receiver's.
    fn failure(self, sender: Sender) -> Failure {
        match (self, sender) {
            (Self::Read(error) | Self::Truncated(error), Sender::Client)
            | (Self::Write(error), Sender::Server) => Failure::Client(error),
            (Self::Read(error) | Self::Truncated(error), Sender::Server)
            | (Self::Write(error), Sender::Client) => Failure::Upstream(error),
            (Self::Body(ChunkError), Sender::Client) => Failure::BadRequestBody,
            (Self::Body(ChunkError), Sender::Server) => Failure::BadResponse,
        }
    }
}

/// Forwards a message: its head (the first `head_len` bytes of `buf`), then its body as
/// framed, reading more from `from` as needed. What follows the body (a pipelined request)
/// stays in `buf`. Head and the body bytes already read go out in one write.
async fn forward_message<R, W>(
    from: &mut R,
    buf: &mut BytesMut,
    to: &mut W,
    head_len: usize,
    framing: Framing,
    count: impl Fn(u64),
) -> Result<(), MessageError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = Remaining::of(framing);
    let mut ready = head_len;
    loop {
        ready += remaining.take(&buf[ready..]).map_err(MessageError::Body)?;
        if ready > 0 {
            to.write_all(&buf[..ready])
                .await
                .map_err(MessageError::Write)?;
            count(ready as u64);
            buf.advance(ready);
            ready = 0;
        }
        if remaining.is_done() {
            return Ok(());
        }
        let read = fill(from, buf, BODY_READ)
            .await
            .map_err(MessageError::Read)?;
        if read == 0 {
            return if remaining.ends_at_close() {
                Ok(())
            } else {
                Err(MessageError::Truncated(io::ErrorKind::UnexpectedEof.into()))
            };
        }
    }
}

/// Reads what is there (at least one byte, or 0 at EOF) onto the end of `buf`.
async fn fill<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
    read_size: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < read_size / 4 {
        buf.reserve(read_size);
    }
    from.read_buf(buf).await
}

/// An idle keep-alive connection holds no buffer: with thousands of them open, their memory is
/// the sockets' alone. (A buffer per request costs an allocation; holding 8 KiB per idle
/// connection would cost more.)
fn release_idle_buffer(buf: &mut BytesMut) {
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
}

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("request head not complete in time")]
    Timeout,
}

#[cfg(test)]
mod tests {
    fn future_size<A, B, C, D, F: std::future::Future>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection's task holds this future for as long as the connection is open, idle
    /// keep-alive connections included (a stray buffer in it once made it 5.5 KiB).
    #[test]
    fn an_http1_connection_task_stays_small() {
        let size = future_size(super::forward);
        assert!(size <= 1536, "forward's future is {size} bytes");
    }
}

/// The head timeout on paused time: tokio's clock jumps to the next timer whenever the
/// runtime is idle, so a 10 s timeout takes no real time, and the elapsed time is exact.
#[cfg(test)]
/// One connection through `forward`, with the timers (head and upstream timeouts) on paused time
/// where a test needs them.
mod exchange_tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        task::JoinHandle,
        time::Instant,
    };

    use super::super::{HttpProxy, test_support};

    const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

    /// An HTTP/1 connection through the proxy: (the application's client socket, the
    /// original destination's socket, the proxy, its task).
    async fn proxied() -> (
        TcpStream,
        TcpStream,
        std::sync::Arc<HttpProxy>,
        JoinHandle<std::io::Result<()>>,
    ) {
        let (app_client, proxy_client) = test_support::loopback_pair().await;
        let (proxy_server, app_server) = test_support::loopback_pair().await;
        let dst = proxy_server.peer_addr().unwrap();
        let proxy = test_support::proxy(HEAD_TIMEOUT);
        let upstream = Some((proxy_server, test_support::counters(&proxy, dst)));
        let task = tokio::spawn(super::forward(
            proxy_client,
            upstream,
            test_support::conn(dst),
            std::sync::Arc::clone(&proxy),
        ));
        (app_client, app_server, proxy, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_completes_gets_408_after_the_head_timeout() {
        let (mut client, mut server, proxy, task) = proxied().await;
        client
            .write_all(b"GET /bytes/1 HTTP/1.1\r\nHost: slow.test\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();

        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
        let response = String::from_utf8(response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{response}"
        );
        assert_eq!(test_support::errors(&proxy, "head_timeout"), 1);
        drop(client);
        task.await.unwrap().unwrap();
        let mut forwarded = Vec::new();
        server.read_to_end(&mut forwarded).await.unwrap();
        assert!(
            forwarded.is_empty(),
            "nothing of an unfinished head goes upstream"
        );
    }

    /// Slow loris: a line every 40% of the timeout keeps every read short, but the head as a
    /// whole is late.
    #[tokio::test(start_paused = true)]
    async fn a_head_dripping_in_line_by_line_gets_408_at_its_deadline() {
        let (client, _server, proxy, _task) = proxied().await;
        let (mut reader, mut writer) = client.into_split();
        let started = Instant::now();
        writer.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let drip = tokio::spawn(async move {
            for line in 0..5 {
                tokio::time::sleep(HEAD_TIMEOUT * 2 / 5).await;
                let header = format!("X-Drip-{line}: 1\r\n");
                if writer.write_all(header.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let mut response = [0u8; 12];
        reader.read_exact(&mut response).await.unwrap();
        // The deadline counts from the head's first byte; a timer per read would answer only
        // once the drip stops, 10 s after its last line.
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
        assert_eq!(&response, b"HTTP/1.1 408");
        assert_eq!(test_support::errors(&proxy, "head_timeout"), 1);
        drip.abort();
    }

    /// test_support::proxy's --upstream-timeout.
    const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
    const UPLOAD_HEAD: &[u8] = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n";

    /// An upload that takes four times the upstream timeout, a byte every 20 s, to a server
    /// that answers once it has all of it: the upload is never cut while it moves.
    #[tokio::test(start_paused = true)]
    async fn an_upload_longer_than_the_upstream_timeout_is_not_cut_while_it_moves() {
        let (client, mut server, proxy, _task) = proxied().await;
        let (mut reader, mut writer) = client.into_split();
        let upload = tokio::spawn(async move {
            writer.write_all(UPLOAD_HEAD).await.unwrap();
            for byte in b"abcdef" {
                tokio::time::sleep(Duration::from_secs(20)).await;
                writer.write_all(&[*byte]).await.unwrap();
            }
            writer
        });
        let mut request = vec![0u8; UPLOAD_HEAD.len() + 6];
        server.read_exact(&mut request).await.unwrap();
        assert!(request.ends_with(b"abcdef"));
        server
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut response = [0u8; 15];
        reader.read_exact(&mut response).await.unwrap();
        assert_eq!(&response, b"HTTP/1.1 200 OK");
        assert_eq!(test_support::errors(&proxy, "upstream_timeout"), 0);
        upload.await.unwrap();
    }

    /// A response that reaches the client whole before the request's body is done (an early
    /// 413, after which the client stops sending) is recorded as it was, not as broken.
    #[tokio::test]
    async fn a_whole_response_before_the_request_ended_is_no_failure() {
        let (mut client, mut server, proxy, task) = proxied().await;
        let dst = server.local_addr().unwrap();
        let head = format!("POST /upload HTTP/1.1\r\nHost: {dst}\r\nContent-Length: 10\r\n\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(b"abc").await.unwrap();
        let mut request = vec![0u8; head.len() + 3];
        server.read_exact(&mut request).await.unwrap();
        let answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n";
        server.write_all(answer).await.unwrap();
        let mut response = vec![0u8; answer.len()];
        client.read_exact(&mut response).await.unwrap();
        assert_eq!(response, answer);
        // The client gives up on the rest of its body.
        client.shutdown().await.unwrap();
        let _ = task.await.unwrap();
        let responses =
            |classification| test_support::responses(&proxy, dst, 413, classification, "");
        assert_eq!(responses("success"), 1);
        assert_eq!(responses("failure"), 0);
    }

    /// An upload that stops halfway, and a server that waits for the rest: 504 once the
    /// request has not moved for the upstream timeout.
    #[tokio::test(start_paused = true)]
    async fn an_upload_that_stops_gets_504_after_the_upstream_timeout() {
        let (mut client, mut server, proxy, _task) = proxied().await;
        client.write_all(UPLOAD_HEAD).await.unwrap();
        client.write_all(b"abc").await.unwrap();
        let mut request = vec![0u8; UPLOAD_HEAD.len() + 3];
        server.read_exact(&mut request).await.unwrap();
        let stopped = Instant::now();
        let mut response = [0u8; 12];
        client.read_exact(&mut response).await.unwrap();
        assert_eq!(&response, b"HTTP/1.1 504");
        assert_eq!(stopped.elapsed(), UPSTREAM_TIMEOUT);
        assert_eq!(test_support::errors(&proxy, "upstream_timeout"), 1);
    }

    /// A head sent a byte at a time (parsed only when a line ends) arrives whole, once; so
    /// do a body's bytes and the next request behind it.
    #[tokio::test(start_paused = true)]
    async fn a_head_sent_a_byte_at_a_time_is_forwarded_once() {
        let (mut client, mut server, _proxy, _task) = proxied().await;
        let request = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nokGET /next HTTP/1.1\r\nHost: a\r\n\r\n";
        for byte in request {
            client.write_all(&[*byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let first = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok";
        let mut forwarded = vec![0u8; first.len()];
        server.read_exact(&mut forwarded).await.unwrap();
        assert_eq!(forwarded, first);
        server
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let second = &request[first.len()..];
        let mut forwarded = vec![0u8; second.len()];
        server.read_exact(&mut forwarded).await.unwrap();
        assert_eq!(forwarded, second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_finished_just_in_time_is_forwarded() {
        let (mut client, mut server, proxy, _task) = proxied().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // Let the proxy read the first part (and start the head's timer) before time moves.
        tokio::task::yield_now().await;
        tokio::time::sleep(HEAD_TIMEOUT - Duration::from_millis(1)).await;
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();

        let mut forwarded = [0u8; 27];
        server.read_exact(&mut forwarded).await.unwrap();
        assert_eq!(&forwarded, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".as_slice());
        assert_eq!(test_support::errors(&proxy, "head_timeout"), 0);
    }
}
