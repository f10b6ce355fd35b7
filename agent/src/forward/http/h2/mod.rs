//! h2c (and gRPC): the client's HTTP/2 connection and the one to its original destination
//! are one end to end connection, its frames passed through unchanged in both directions
//! (`copy`), while `streams` follows them for request metrics: SETTINGS, flow control,
//! GOAWAY, PING, upgrades (CONNECT) and every stream reach the other end as they were sent,
//! so the client sees its origin's behaviour, connection turnover included, as it would
//! directly. Only an unreachable upstream is answered by the agent itself: hyper serves the
//! client and answers each request 502.

mod frames;
mod hpack;
mod streams;

use std::{convert::Infallible, sync::Arc};

use hyper::{
    HeaderMap, Request, Response, StatusCode, body::Incoming, header,
    server::conn::http2 as server_h2, service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use self::streams::Http2Observer;
use super::{
    ConnInfo, HttpProxy,
    observe::{ConnRecorder, ProxyBody, RequestSummary},
};
use crate::forward::{ByteCounters, copy, opaque::Outcome};

// pub(crate) for `crate::fuzzing`.
pub use self::{
    frames::{Event, FrameScanner, ScanError},
    hpack::{HpackDecoder, HpackError},
};

/// GOAWAY, last stream id 2^31-1, NO_ERROR: RFC 9113 section 6.8's first step of a graceful
/// shutdown ("initiating further requests is prohibited"), which refuses no stream the client
/// has already sent, wherever it is on its way.
const GOAWAY_AT_SHUTDOWN: [u8; 17] = [
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0,
];

/// Passes an h2c client connection's frames to `server`, the connection to the original
/// destination, and the server's back, observing both.
pub(super) async fn forward(
    client: TcpStream,
    server: TcpStream,
    conn: ConnInfo,
    counters: ByteCounters,
    proxy: Arc<HttpProxy>,
) -> Outcome {
    let draining = proxy.draining.clone();
    // Both directions run on this task: the lock is never contended, only Sync.
    let observer = parking_lot::Mutex::new(Http2Observer::new(proxy, conn));
    let may_go = || observer.lock().may_interject();
    // At shutdown the client hears that no new stream may start, as it would from a server
    // shutting down gracefully; the streams it has open finish.
    let goaway = copy::Interjection {
        when: &draining,
        may_go: &may_go,
        bytes: &GOAWAY_AT_SHUTDOWN,
    };
    let outcome = copy::copy_observed(
        client,
        server,
        &counters,
        |bytes| observer.lock().client_bytes(bytes),
        |bytes| observer.lock().server_bytes(bytes),
        Some(goaway),
        &|peer| observer.lock().peer_ended(peer),
    )
    .await;
    observer.lock().connection_ended();
    outcome
}

/// For the fuzz target: one connection's chunks (`true`: the client's) through an observer of
/// a proxy with no kernel behind its metrics: whatever the bytes, no panic and no hang.
pub fn observe_chunks(chunks: &[(bool, &[u8])]) {
    let metrics = Arc::new(crate::metrics::Metrics::new(Box::new(|| {
        Ok(Default::default())
    })));
    let proxy = Arc::new(HttpProxy {
        metrics,
        tap: Arc::new(crate::tap::Tap::default()),
        upstream_timeout: std::time::Duration::from_secs(1),
        head_timeout: std::time::Duration::from_secs(1),
        dialer: crate::connect::Dialer {
            bypass_mark: 0,
            timeout: std::time::Duration::from_secs(1),
            keepalive: None,
        },
        draining: tokio_util::sync::CancellationToken::new(),
    });
    let conn = ConnInfo {
        id: 1,
        dst: std::net::SocketAddr::from(([127, 0, 0, 1], 80)),
        origin: crate::netns::Origin::host(0),
        workload: Default::default(),
        direction: crate::metrics::Direction::Outbound,
    };
    let mut observer = Http2Observer::new(proxy, conn);
    for (from_client, bytes) in chunks {
        if *from_client {
            observer.client_bytes(bytes);
        } else {
            observer.server_bytes(bytes);
        }
    }
    // As if the server had ended the connection: the path that records unanswered streams.
    observer.peer_ended(copy::Peer::Server);
    observer.connection_ended();
}

/// Serves an h2c client connection whose upstream could not be reached: every request gets
/// 502.
pub(super) async fn serve_unavailable(
    client: TcpStream,
    conn: ConnInfo,
    proxy: Arc<HttpProxy>,
) -> Result<(), hyper::Error> {
    let service_proxy = Arc::clone(&proxy);
    let recorder = ConnRecorder::new(&proxy, conn.clone());
    let service = service_fn(move |request| {
        let response = service_proxy.answer_unavailable(&request, &recorder);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let connection = server_h2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(client), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = proxy.draining.cancelled() => {
            // GOAWAY: streams in flight finish, no new ones start.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = &result
        && error.is_parse()
    {
        // hyper has already answered (or sent GOAWAY) and closed the connection.
        proxy.count_error(&conn, "bad_request");
    }
    result
}

impl HttpProxy {
    /// One request to an unreachable upstream, answered 502 and recorded.
    fn answer_unavailable(
        &self,
        request: &Request<Incoming>,
        recorder: &Arc<ConnRecorder>,
    ) -> Response<ProxyBody> {
        let raw_authority = authority_of(request);
        let record = recorder.begin(raw_authority, is_grpc(request.headers()), || {
            RequestSummary {
                method: request.method().to_string(),
                authority: raw_authority.to_string(),
                path: request.uri().path().to_string(),
            }
        });
        self.count_error(&recorder.conn, "upstream_unavailable");
        record.local_response(StatusCode::BAD_GATEWAY)
    }
}

/// :authority for HTTP/2 (and absolute-form HTTP/1), else the Host header.
fn authority_of(request: &Request<Incoming>) -> &str {
    if let Some(authority) = request.uri().authority() {
        return authority.as_str();
    }
    request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("")
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// hyper's HTTP/2 client and server talking through `forward`: every byte passes, every
/// stream is recorded once with its status and gRPC status, a CONNECT tunnel carries bytes.
#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
    use hyper::{
        HeaderMap, Method, Request, Response, StatusCode, body::Frame, body::Incoming,
        client::conn::http2 as client_h2, server::conn::http2 as server_h2, service::service_fn,
    };
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::{forward, frames::tests::frame};
    use crate::{
        forward::{
            http::{HttpProxy, test_support},
            opaque::Outcome,
        },
        metrics::{Direction, http::ResponseLabels},
    };

    type Body = BoxBody<Bytes, Infallible>;

    /// /status/N answers N with a body; /grpc/N answers a gRPC status N in trailers;
    /// CONNECT echoes the tunnel's bytes.
    async fn origin(stream: TcpStream) {
        let service = service_fn(|mut request: Request<Incoming>| async move {
            let path = request.uri().path().to_string();
            if request.method() == Method::CONNECT {
                let upgrade = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    if let Ok(upgraded) = upgrade.await {
                        let (mut from, mut to) = tokio::io::split(TokioIo::new(upgraded));
                        let _ = tokio::io::copy(&mut from, &mut to).await;
                        let _ = to.shutdown().await;
                    }
                });
                return Ok::<_, Infallible>(Response::new(Empty::new().boxed()));
            }
            let request_body = request.into_body().collect().await.unwrap().to_bytes();
            let (kind, number) = path.trim_start_matches('/').split_once('/').unwrap();
            let number: u16 = number.parse().unwrap();
            let response: Response<Body> = if kind == "grpc" {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", number.to_string().parse().unwrap());
                let frames = [Frame::data(request_body), Frame::trailers(trailers)];
                Response::builder()
                    .header("content-type", "application/grpc")
                    .body(Frames(frames.into()).boxed())
                    .unwrap()
            } else {
                let mut body = request_body.to_vec();
                body.extend(vec![b'x'; 100_000]);
                Response::builder()
                    .status(number)
                    .body(Full::new(Bytes::from(body)).boxed())
                    .unwrap()
            };
            Ok(response)
        });
        let _ = server_h2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    }

    /// A body of the given frames, in order.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            std::task::Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn responses(proxy: &HttpProxy, dst: SocketAddr, status: u16, grpc_status: &str) -> u64 {
        let grpc = !grpc_status.is_empty();
        // Status 0: no valid response head came, a failure.
        let success = if grpc {
            grpc_status == "0"
        } else {
            status != 0 && status < 500
        };
        let classification = if success { "success" } else { "failure" };
        test_support::responses(proxy, dst, status, classification, grpc_status)
    }

    /// `origin` behind `forward`: the client's socket, the origin's address, the proxy and
    /// the forwarding task.
    async fn through_forward() -> (
        TcpStream,
        SocketAddr,
        Arc<HttpProxy>,
        tokio::task::JoinHandle<Outcome>,
    ) {
        through_forward_to(origin).await
    }

    /// `through_forward` with an origin of the test's own.
    async fn through_forward_to<F: Future<Output = ()> + Send + 'static>(
        origin: impl FnOnce(TcpStream) -> F,
    ) -> (
        TcpStream,
        SocketAddr,
        Arc<HttpProxy>,
        tokio::task::JoinHandle<Outcome>,
    ) {
        let (app_client, proxy_client) = test_support::loopback_pair().await;
        let (proxy_server, app_server) = test_support::loopback_pair().await;
        let dst = proxy_server.peer_addr().unwrap();
        let proxy = test_support::proxy(Duration::from_secs(10));
        tokio::spawn(origin(app_server));
        let counters = test_support::counters(&proxy, dst);
        let connection = tokio::spawn(forward(
            proxy_client,
            proxy_server,
            test_support::conn(dst),
            counters,
            Arc::clone(&proxy),
        ));
        (app_client, dst, proxy, connection)
    }

    #[tokio::test]
    async fn streams_pass_unchanged_and_are_recorded_once_each() {
        let (app_client, dst, proxy, connection) = through_forward().await;

        let (sender, client_connection) =
            client_h2::handshake(TokioExecutor::new(), TokioIo::new(app_client))
                .await
                .unwrap();
        tokio::spawn(client_connection);
        let request = |path: String, body: &'static [u8]| {
            let mut sender = sender.clone();
            async move {
                let content_type = if path.starts_with("/grpc") {
                    "application/grpc"
                } else {
                    "text/plain"
                };
                let request = Request::post(format!("http://{dst}{path}"))
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from_static(body)))
                    .unwrap();
                let response = sender.send_request(request).await.unwrap();
                let status = response.status();
                let collected = response.into_body().collect().await.unwrap();
                let trailers = collected.trailers().cloned();
                (status, collected.to_bytes(), trailers)
            }
        };
        // Twenty at once (interleaved frames on one connection), then the other kinds.
        let concurrent: Vec<_> = (0..20)
            .map(|_| tokio::spawn(request("/status/200".into(), b"ping")))
            .collect();
        for handle in concurrent {
            let (status, body, _) = handle.await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.len(), 4 + 100_000);
            assert!(body.starts_with(b"ping"));
        }
        let (status, _, _) = request("/status/503".into(), b"").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (_, body, trailers) = request("/grpc/0".into(), b"grpc payload").await;
        assert_eq!(&body[..], b"grpc payload");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        let (_, _, trailers) = request("/grpc/7".into(), b"").await;
        assert_eq!(trailers.unwrap()["grpc-status"], "7");

        // A CONNECT tunnel: DATA frames both ways, passed like any other.
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("tunnel.test:443")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.clone().send_request(connect).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut tunnel = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
        tunnel.write_all(b"through").await.unwrap();
        let mut echoed = [0u8; 7];
        tunnel.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"through");
        drop(tunnel);
        drop(sender);

        let outcome = tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("the connection ends with its client")
            .unwrap();
        assert!(matches!(outcome, Outcome::Closed));
        assert_eq!(responses(&proxy, dst, 200, ""), 20);
        assert_eq!(responses(&proxy, dst, 503, ""), 1);
        assert_eq!(responses(&proxy, dst, 200, "0"), 1);
        assert_eq!(responses(&proxy, dst, 200, "7"), 1);
        let tunnel_labels = ResponseLabels {
            direction: Direction::Outbound,
            target_port: dst.port(),
            authority: "tunnel.test:443".into(),
            status_code: 200,
            classification: "failure",
            grpc_status: String::new(),
            workload: Default::default(),
        };
        // The tunnel's stream ended with its connection, its response begun: broken.
        assert_eq!(
            proxy
                .metrics
                .http
                .response_total
                .get_or_create(&tunnel_labels)
                .get(),
            1
        );
        assert_eq!(test_support::errors(&proxy, "upstream_unavailable"), 0);
    }

    /// An origin that takes requests and never answers them. Each request notifies
    /// `received`; once `hang_up` is notified, the origin closes the connection (a crashed or
    /// restarted server, as the client sees it).
    async fn unanswering_origin(
        stream: TcpStream,
        received: Arc<tokio::sync::Notify>,
        hang_up: Arc<tokio::sync::Notify>,
    ) {
        let service = service_fn(move |_: Request<Incoming>| {
            received.notify_one();
            std::future::pending::<Result<Response<Body>, Infallible>>()
        });
        let serving = server_h2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            _ = serving => {}
            () = hang_up.notified() => {}
        }
    }

    /// `forward` to an `unanswering_origin`: the client's socket, the origin's address, the
    /// proxy, the forwarding task, and the origin's `received` and `hang_up`.
    async fn through_forward_to_unanswering() -> (
        TcpStream,
        SocketAddr,
        Arc<HttpProxy>,
        tokio::task::JoinHandle<Outcome>,
        Arc<tokio::sync::Notify>,
        Arc<tokio::sync::Notify>,
    ) {
        let received = Arc::new(tokio::sync::Notify::new());
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let (origin_received, origin_hang_up) = (Arc::clone(&received), Arc::clone(&hang_up));
        let (app_client, dst, proxy, connection) = through_forward_to(move |stream| {
            unanswering_origin(stream, origin_received, origin_hang_up)
        })
        .await;
        (app_client, dst, proxy, connection, received, hang_up)
    }

    /// Opens an h2c connection over `app_client` and sends one GET to `dst` in the
    /// background; returns the connection's task (abort it to drop the connection) and the
    /// request's.
    async fn one_request(
        app_client: TcpStream,
        dst: SocketAddr,
    ) -> (
        tokio::task::JoinHandle<hyper::Result<()>>,
        tokio::task::JoinHandle<hyper::Result<Response<Incoming>>>,
    ) {
        let (mut sender, client_connection) =
            client_h2::handshake(TokioExecutor::new(), TokioIo::new(app_client))
                .await
                .unwrap();
        let client_connection = tokio::spawn(client_connection);
        let request = Request::get(format!("http://{dst}/never"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::spawn(async move { sender.send_request(request).await });
        (client_connection, response)
    }

    fn requests(proxy: &HttpProxy, dst: SocketAddr) -> u64 {
        let labels = crate::metrics::http::RequestLabels {
            direction: Direction::Outbound,
            target_port: dst.port(),
            authority: dst.to_string(),
            workload: Default::default(),
        };
        proxy
            .metrics
            .http
            .request_total
            .get_or_create(&labels)
            .get()
    }

    /// The origin closes its connection with a request unanswered: the client never gets a
    /// response, and the stream is recorded as a failure without a status (the agent passes
    /// the connection's end on; it does not answer for the origin).
    #[tokio::test]
    async fn a_request_the_origin_hangs_up_on_is_a_failure() {
        let (app_client, dst, proxy, connection, received, hang_up) =
            through_forward_to_unanswering().await;
        let (client_connection, response) = one_request(app_client, dst).await;
        tokio::time::timeout(Duration::from_secs(10), received.notified())
            .await
            .expect("the origin gets the request");
        hang_up.notify_one();

        let answer = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("the request ends with its connection")
            .unwrap();
        assert!(answer.is_err(), "no response, an error: {answer:?}");
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("forwarding ends with the origin's connection")
            .unwrap();
        client_connection.abort();
        assert_eq!(requests(&proxy, dst), 1);
        assert_eq!(responses(&proxy, dst, 0, ""), 1);
    }

    /// The client drops its connection with a request unanswered: it gave up on it, which is
    /// not the origin's failure, and nothing is recorded for the stream. (Raw frames: hyper's
    /// client cannot close its socket without resetting the stream first, and a reset from
    /// the client is never recorded either.)
    #[tokio::test]
    async fn a_request_the_client_gives_up_on_is_not_recorded() {
        let (mut app_client, dst, proxy, connection, received, _hang_up) =
            through_forward_to_unanswering().await;
        app_client.write_all(&get_on_stream(dst, 1)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), received.notified())
            .await
            .expect("the origin gets the request");
        drop(app_client);

        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("forwarding ends with the client's connection")
            .unwrap();
        assert_eq!(requests(&proxy, dst), 1);
        assert_eq!(responses(&proxy, dst, 0, ""), 0);
    }

    /// A header block on a stream id the client may no longer open (at or below one it
    /// opened before, as trailers of a stream the server already ended are) is not counted as
    /// a request, nor as a failure when the connection ends.
    #[tokio::test]
    async fn headers_on_a_stream_id_already_passed_are_not_a_new_request() {
        let (mut app_client, dst, proxy, connection, received, hang_up) =
            through_forward_to_unanswering().await;
        // A request on stream 3, then a header block on stream 1 (passed already).
        app_client.write_all(&get_on_stream(dst, 3)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), received.notified())
            .await
            .expect("the origin gets the request");
        app_client
            .write_all(&frame(0x1, 0x5, 1, &[0x82, 0x86, 0x84]))
            .await
            .unwrap();
        hang_up.notify_one();
        // The origin's end reaches the client, which then closes its side.
        let mut passed_on = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            app_client.read_to_end(&mut passed_on),
        )
        .await
        .expect("the origin's end reaches the client")
        .unwrap();
        drop(app_client);

        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("forwarding ends with the origin's connection")
            .unwrap();
        assert_eq!(requests(&proxy, dst), 1);
        assert_eq!(responses(&proxy, dst, 0, ""), 1);
    }

    /// A stream the server resets before answering it is a failure without a status, unless
    /// the reset says REFUSED_STREAM (never processed: the client may retry it).
    #[tokio::test]
    async fn a_stream_the_server_resets_unanswered_is_a_failure_unless_refused() {
        const INTERNAL_ERROR: u32 = 0x2;
        const REFUSED_STREAM: u32 = 0x7;
        for (code, failures) in [(INTERNAL_ERROR, 1), (REFUSED_STREAM, 0)] {
            let (mut app_client, dst, proxy, connection) =
                through_forward_to(move |stream| resetting_origin(stream, code)).await;
            app_client.write_all(&get_on_stream(dst, 1)).await.unwrap();
            // The server's SETTINGS and its RST_STREAM reach the client.
            let mut answer = vec![0; 9 + 6 + 9 + 4];
            tokio::time::timeout(Duration::from_secs(10), app_client.read_exact(&mut answer))
                .await
                .expect("the reset reaches the client")
                .unwrap();
            assert_eq!(&answer[9 + 6..][3..4], &[0x3], "RST_STREAM");
            drop(app_client);
            tokio::time::timeout(Duration::from_secs(10), connection)
                .await
                .expect("forwarding ends with the client's connection")
                .unwrap();
            assert_eq!(requests(&proxy, dst), 1, "code {code}");
            assert_eq!(responses(&proxy, dst, 0, ""), failures, "code {code}");
        }
    }

    /// In raw frames, the client's preface, an empty SETTINGS and a GET to `dst` on `stream`
    /// (HEADERS with END_STREAM | END_HEADERS).
    fn get_on_stream(dst: SocketAddr, stream: u32) -> Vec<u8> {
        let authority = dst.to_string();
        // :method GET, :scheme http, :path / (static table), :authority (literal).
        let mut block = vec![0x82, 0x86, 0x84, 0x41, authority.len() as u8];
        block.extend_from_slice(authority.as_bytes());
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, &[]));
        bytes.extend(frame(0x1, 0x5, stream, &block));
        bytes
    }

    /// An origin of raw frames: once it has the client's request (`get_on_stream`), it
    /// sends its SETTINGS and resets stream 1 with `code`, then waits for the client to go.
    async fn resetting_origin(mut stream: TcpStream, code: u32) {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        // Preface (24), SETTINGS (9), HEADERS head (9) and its block: at least 50 bytes.
        while request.len() < 50 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(len) => request.extend_from_slice(&buf[..len]),
            }
        }
        let mut answer = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        answer.extend(frame(0x3, 0, 1, &code.to_be_bytes()));
        let _ = stream.write_all(&answer).await;
        let _ = stream.read_to_end(&mut request).await;
    }

    /// At shutdown the client gets a GOAWAY from the agent: a stream in flight finishes, no
    /// new one starts, and the client closes the connection, which ends the forwarding.
    #[tokio::test]
    async fn draining_sends_the_client_a_goaway_between_frames() {
        let (app_client, dst, proxy, connection) = through_forward().await;
        let (mut sender, client_connection) =
            client_h2::handshake(TokioExecutor::new(), TokioIo::new(app_client))
                .await
                .unwrap();
        let client_connection = tokio::spawn(client_connection);
        let get = |sender: &mut client_h2::SendRequest<Full<Bytes>>| {
            let request = Request::get(format!("http://{dst}/status/200"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            sender.send_request(request)
        };
        let response = get(&mut sender).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // A response still being read when the drain starts.
        let in_flight = response.into_body();

        proxy.draining.cancel();
        let body = tokio::time::timeout(Duration::from_secs(10), in_flight.collect())
            .await
            .expect("the stream in flight finishes")
            .unwrap();
        assert_eq!(body.to_bytes().len(), 100_000);
        // Streams sent before the GOAWAY arrived are answered (it refuses none); hyper
        // refuses new ones once it has read it.
        let mut answered_after_drain = 0;
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(response) = get(&mut sender).await {
                response.into_body().collect().await.unwrap();
                answered_after_drain += 1;
            }
        });
        refused
            .await
            .expect("a new stream is refused after the GOAWAY");
        drop(sender);
        tokio::time::timeout(Duration::from_secs(10), client_connection)
            .await
            .expect("the client closes its connection")
            .unwrap()
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("forwarding ends with the client")
            .unwrap();
        assert!(matches!(outcome, Outcome::Closed));
        assert_eq!(responses(&proxy, dst, 200, ""), 1 + answered_after_drain);
    }
}
