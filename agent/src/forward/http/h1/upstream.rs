//! The HTTP/1 forwarder's upstream side: one exchange (request out, response back, their
//! bodies moving at once), the re-dial of a connection the server closed while idle, and the
//! reading of response heads (interim ones forwarded).

use super::*;

/// The upstream side of one client connection: its connection to the original destination
/// (re-opened when the server closed it) and the bytes read from it.
pub(super) struct Upstream {
    /// None after the connection failed or the server ended it; re-opened on the next request.
    pub(super) stream: Option<TcpStream>,
    pub(super) buf: BytesMut,
    pub(super) counters: ByteCounters,
    /// The current request went out on a connection that had carried an earlier one.
    pub(super) reused: bool,
    /// Whether the connection in `stream` has carried a request.
    pub(super) used: bool,
}

impl Upstream {
    /// Sends the request (head and body) and brings the response back to the client. The
    /// request body and the response move concurrently. The server has `upstream_timeout` to
    /// begin its response, counted from the last request byte that moved: an upload that
    /// keeps moving is never cut, however long it takes (counted from the request's start,
    /// every upload over 30 s got a 504 from a healthy server).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn exchange(
        &mut self,
        client: &mut TcpStream,
        client_buf: &mut BytesMut,
        request: &RequestHead,
        record: &mut ResponseRecord,
        response_progress: &ResponseProgress,
        proxy: &HttpProxy,
        conn: &ConnInfo,
    ) -> Result<ResponseHead, Failure> {
        self.connect_if_closed(proxy, conn).await?;
        let Self {
            stream: Some(server),
            buf: server_buf,
            counters,
            ..
        } = self
        else {
            return Err(Failure::Upstream(io::ErrorKind::NotConnected.into()));
        };
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let progress = RequestProgress::new();
        let request_side = async {
            if request.framing == Framing::Empty {
                // The head stays in the client's buffer until the response is in, so that it
                // can be sent again should this connection turn out closed.
                server_write
                    .write_all(&client_buf[..request.len])
                    .await
                    .map_err(Failure::Upstream)?;
                counters.client_to_server(request.len as u64);
                progress.moved();
                return Ok(());
            }
            forward_message(
                &mut client_read,
                client_buf,
                &mut server_write,
                request.len,
                request.framing,
                |bytes| {
                    counters.client_to_server(bytes);
                    progress.moved();
                },
            )
            .await
            .map_err(|error| error.failure(Sender::Client))
        };
        let response_side = async {
            let response = progress
                .bound(
                    proxy.upstream_timeout,
                    read_response_head(
                        &mut server_read,
                        server_buf,
                        &mut client_write,
                        request,
                        counters,
                    ),
                )
                .await??;
            record.response_started(response.status);
            response_progress.started.store(true, Ordering::Relaxed);
            forward_message(
                &mut server_read,
                server_buf,
                &mut client_write,
                response.len,
                response.framing,
                |bytes| counters.server_to_client(bytes),
            )
            .await
            .map_err(|error| error.failure(Sender::Server))?;
            response_progress.complete.store(true, Ordering::Relaxed);
            Ok(response)
        };
        let ((), response) = tokio::try_join!(request_side, response_side)?;
        Ok(response)
    }

    /// Re-opens the upstream connection if the server closed it while idle (or never opened).
    async fn connect_if_closed(
        &mut self,
        proxy: &HttpProxy,
        conn: &ConnInfo,
    ) -> Result<(), Failure> {
        let reusable = self
            .stream
            .as_ref()
            .is_some_and(|stream| self.buf.is_empty() && !closed_while_idle(stream));
        // The connection opened at accept counts as fresh: it has carried nothing yet.
        self.reused = reusable && self.used;
        self.used = true;
        if !reusable {
            self.buf.clear();
            self.stream = Some(
                proxy
                    .dialer
                    .connect(conn.dst, &conn.origin, conn.direction)
                    .await
                    .map_err(Failure::Upstream)?,
            );
        }
        Ok(())
    }
}

/// How far an exchange's response got, for what a failure of the exchange means.
#[derive(Default)]
pub(super) struct ResponseProgress {
    /// Its head went to the client: after that, a failure can only close.
    pub(super) started: AtomicBool,
    /// All of it went to the client: a failure after that (the request side's) is no failure
    /// of the response.
    pub(super) complete: AtomicBool,
}

/// When a request's bytes last moved, for the wait on its response head.
struct RequestProgress {
    start: Instant,
    /// Since `start`, in nanoseconds (an atomic: both sides of the exchange see it).
    last_moved: AtomicU64,
}

impl RequestProgress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_moved: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let since_start = self.start.elapsed().as_nanos();
        self.last_moved.store(
            u64::try_from(since_start).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn deadline(&self, timeout: Duration) -> Instant {
        self.start + Duration::from_nanos(self.last_moved.load(Ordering::Relaxed)) + timeout
    }

    /// `wait`, or `Failure::Timeout` once `timeout` has passed since the request last moved.
    async fn bound<T>(
        &self,
        timeout: Duration,
        wait: impl Future<Output = T>,
    ) -> Result<T, Failure> {
        tokio::pin!(wait);
        loop {
            let deadline = self.deadline(timeout);
            tokio::select! {
                result = &mut wait => return Ok(result),
                () = tokio::time::sleep_until(deadline) => {
                    // The request may have moved while this slept: wait on from there.
                    if self.deadline(timeout) <= Instant::now() {
                        return Err(Failure::Timeout);
                    }
                }
            }
        }
    }
}

/// Reads response heads, forwarding interim ones (100 Continue, 103), up to the final one,
/// which stays at the start of `buf`.
async fn read_response_head<R, W>(
    server: &mut R,
    buf: &mut BytesMut,
    client: &mut W,
    request: &RequestHead,
    counters: &ByteCounters,
) -> Result<ResponseHead, Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        match head::parse_response(buf, request) {
            Ok(Some(response)) if response.is_interim() => {
                client
                    .write_all(&buf[..response.len])
                    .await
                    .map_err(Failure::Client)?;
                counters.server_to_client(response.len as u64);
                buf.advance(response.len);
                continue;
            }
            Ok(Some(response)) => return Ok(response),
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "malformed response");
                return Err(Failure::BadResponse);
            }
        }
        let read = fill(server, buf, HEAD_READ)
            .await
            .map_err(Failure::Upstream)?;
        if read == 0 {
            return Err(Failure::Upstream(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Whether the server closed (or sent something unasked) while the connection was idle. Asks
/// tokio's readiness first, so a quiet connection costs no system call.
fn closed_while_idle(stream: &TcpStream) -> bool {
    let mut context = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut context) {
        Poll::Pending => false,
        Poll::Ready(Err(_)) => true,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            !matches!(stream.try_read(&mut byte), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
        }
    }
}
