//! HTTP forwarding with hyper: the client's connection is served as HTTP/1 or h2c, and every
//! request goes to the original destination over the one upstream connection opened for this
//! client (no load balancing yet), with request-level metrics. Upgrades (WebSocket 101,
//! CONNECT 2xx) continue as a raw byte tunnel. The proxy answers itself only when it must:
//! 400 for malformed requests (hyper), 502 when the upstream is unreachable or fails, 504 when
//! its response headers take longer than the upstream timeout.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1 as client_h1, http2 as client_h2},
    header,
    server::conn::{http1 as server_h1, http2 as server_h2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex};

use super::io::{Counted, Rewind};
use crate::metrics::{
    Direction,
    http::{HttpErrorLabels, HttpMetrics, LatencyLabels, RequestLabels, ResponseLabels},
};

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;
type ClientIo = TokioIo<Rewind<TcpStream>>;
type ServerIo = TokioIo<Counted<TcpStream>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// What every request of one client connection shares.
pub struct HttpProxy {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub upstream_timeout: Duration,
}

/// The upstream connection's request sender.
enum Upstream {
    /// HTTP/1 sends one request at a time; the lock keeps pipelined requests in order.
    Http1(Mutex<client_h1::SendRequest<Incoming>>),
    Http2(client_h2::SendRequest<Incoming>),
    /// The upstream could not be reached: every request gets 502.
    Unavailable,
}

impl Upstream {
    async fn send(&self, request: Request<Incoming>) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Self::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await
            }
            Self::Http2(sender) => sender.clone().send_request(request).await,
            Self::Unavailable => {
                unreachable!("requests to an unavailable upstream are answered 502")
            }
        }
    }
}

/// The errno label for a failed HTTP connection: the socket error underneath, if any;
/// protocol errors (hyper already answered 400) close cleanly.
pub fn errno_of(error: &hyper::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return crate::metrics::errno_name(io);
        }
        source = current.source();
    }
    ""
}

/// Proxies HTTP between `client` (whose first bytes are `prefix`) and `server`.
pub async fn forward(
    client: TcpStream,
    prefix: Bytes,
    server: Counted<TcpStream>,
    version: Version,
    proxy: Arc<HttpProxy>,
) -> Result<(), hyper::Error> {
    let server_io = TokioIo::new(server);
    let upstream = match version {
        Version::Http1 => {
            let (sender, connection) = client_h1::handshake(server_io).await?;
            tokio::spawn(connection.with_upgrades());
            Upstream::Http1(Mutex::new(sender))
        }
        Version::Http2 => {
            let (sender, connection) =
                client_h2::handshake::<_, ServerIo, Incoming>(TokioExecutor::new(), server_io)
                    .await?;
            tokio::spawn(connection);
            Upstream::Http2(sender)
        }
    };
    serve(client, prefix, version, Arc::new(upstream), proxy).await
}

/// Serves an HTTP client whose upstream could not be reached: each request gets 502.
pub async fn serve_unavailable(
    client: TcpStream,
    prefix: Bytes,
    version: Version,
    proxy: Arc<HttpProxy>,
) -> Result<(), hyper::Error> {
    serve(
        client,
        prefix,
        version,
        Arc::new(Upstream::Unavailable),
        proxy,
    )
    .await
}

async fn serve(
    client: TcpStream,
    prefix: Bytes,
    version: Version,
    upstream: Arc<Upstream>,
    proxy: Arc<HttpProxy>,
) -> Result<(), hyper::Error> {
    let client_io: ClientIo = TokioIo::new(Rewind::new(prefix, client));
    let service_proxy = Arc::clone(&proxy);
    let service = service_fn(move |request| {
        let (upstream, proxy) = (Arc::clone(&upstream), Arc::clone(&service_proxy));
        async move { Ok::<_, Infallible>(proxy.handle(request, &upstream).await) }
    });
    let result = match version {
        Version::Http1 => {
            server_h1::Builder::new()
                .serve_connection(client_io, service)
                .with_upgrades()
                .await
        }
        Version::Http2 => {
            server_h2::Builder::new(TokioExecutor::new())
                .serve_connection(client_io, service)
                .await
        }
    };
    if let Err(error) = &result
        && error.is_parse()
    {
        // hyper has already answered 400 (or 431/414) and closed the connection.
        proxy.count_error("bad_request");
    }
    result
}

impl HttpProxy {
    async fn handle(
        &self,
        mut request: Request<Incoming>,
        upstream: &Upstream,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let authority = self.metrics.http.authority_label(&authority_of(&request));
        let http = &self.metrics.http;
        http.request_total
            .get_or_create(&RequestLabels {
                direction: Direction::Outbound,
                authority: authority.clone(),
            })
            .inc();
        let grpc = is_grpc(request.headers());
        let record = ResponseRecord {
            metrics: Arc::clone(&self.metrics),
            authority,
            grpc,
            started,
        };
        if matches!(upstream, Upstream::Unavailable) {
            self.count_error("upstream_unavailable");
            return record.local(StatusCode::BAD_GATEWAY, false);
        }
        let client_upgrade = wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let is_connect = request.method() == Method::CONNECT;
        let is_http1 = matches!(upstream, Upstream::Http1(_));
        let mut response =
            match tokio::time::timeout(self.upstream_timeout, upstream.send(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "upstream request failed");
                    self.count_error("upstream_unavailable");
                    return record.local(StatusCode::BAD_GATEWAY, is_http1);
                }
                Err(_) => {
                    self.count_error("upstream_timeout");
                    // The HTTP/1 upstream connection is stuck mid-request: close this one too.
                    return record.local(StatusCode::GATEWAY_TIMEOUT, is_http1);
                }
            };
        let tunnel = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (is_connect && response.status().is_success());
        if let (true, Some(client_upgrade)) = (tunnel, client_upgrade) {
            let server_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel_upgraded(client_upgrade, server_upgrade));
        }
        record.upstream(response)
    }

    fn count_error(&self, reason: &'static str) {
        let labels = HttpErrorLabels {
            direction: Direction::Outbound,
            reason,
        };
        self.metrics.http.errors_total.get_or_create(&labels).inc();
    }
}

/// After a 101 or a successful CONNECT both sides speak raw bytes: copy them until either ends.
async fn tunnel_upgraded(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    let (client, server) = match tokio::try_join!(client, server) {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(%error, "upgraded tunnel ended");
    }
}

/// :authority for HTTP/2 (and absolute-form HTTP/1), else the Host header.
fn authority_of(request: &Request<Incoming>) -> String {
    if let Some(authority) = request.uri().authority() {
        return authority.as_str().to_string();
    }
    request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

fn wants_upgrade(request: &Request<Incoming>) -> bool {
    request.method() == Method::CONNECT || request.headers().contains_key(header::UPGRADE)
}

fn grpc_status(headers: &HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

/// What a response is recorded with, once its end (or its abandonment) is known.
struct ResponseRecord {
    metrics: Arc<crate::metrics::Metrics>,
    authority: String,
    grpc: bool,
    started: Instant,
}

impl ResponseRecord {
    /// A response the proxy makes itself (502/504).
    fn local(self, status: StatusCode, close: bool) -> Response<ProxyBody> {
        self.latency(status);
        let outcome = Outcome {
            status: status.as_u16(),
            grpc_status: None,
            broken: false,
        };
        self.finish(&outcome);
        let body = Full::new(Bytes::from(format!("{status}\n"))).map_err(|never| match never {});
        let mut response = Response::new(UnsyncBoxBody::new(body));
        *response.status_mut() = status;
        if close {
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        response
    }

    /// The upstream's response, observed until its body ends.
    fn upstream(self, response: Response<Incoming>) -> Response<ProxyBody> {
        self.latency(response.status());
        let outcome = Outcome {
            status: response.status().as_u16(),
            // A trailers-only gRPC response carries its status in the headers.
            grpc_status: grpc_status(response.headers()),
            broken: false,
        };
        response.map(|body| {
            UnsyncBoxBody::new(ObservedBody {
                inner: body,
                outcome,
                record: Some(self),
            })
        })
    }

    fn latency(&self, status: StatusCode) {
        let labels = LatencyLabels {
            direction: Direction::Outbound,
            authority: self.authority.clone(),
            status_code: status.as_u16(),
        };
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        self.metrics
            .http
            .response_latency_ms
            .get_or_create(&labels)
            .observe(millis);
    }

    fn finish(&self, outcome: &Outcome) {
        let http: &HttpMetrics = &self.metrics.http;
        let labels = ResponseLabels {
            direction: Direction::Outbound,
            authority: self.authority.clone(),
            status_code: outcome.status,
            classification: outcome.classification(self.grpc),
            grpc_status: if self.grpc {
                outcome.grpc_status.clone().unwrap_or_default()
            } else {
                String::new()
            },
        };
        http.response_total.get_or_create(&labels).inc();
    }
}

struct Outcome {
    status: u16,
    grpc_status: Option<String>,
    /// The response body failed midway.
    broken: bool,
}

impl Outcome {
    /// gRPC: success only with grpc-status 0. HTTP: 5xx is failure. A broken body is failure.
    fn classification(&self, grpc: bool) -> &'static str {
        let failed = self.broken
            || if grpc {
                self.status >= 500 || self.grpc_status.as_deref() != Some("0")
            } else {
                self.status >= 500
            };
        if failed { "failure" } else { "success" }
    }
}

/// The upstream's response body, passed through frame by frame; records the response when the
/// stream ends (trailers carry gRPC's status) or is dropped unfinished.
struct ObservedBody {
    inner: Incoming,
    outcome: Outcome,
    record: Option<ResponseRecord>,
}

impl ObservedBody {
    fn finish(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(&self.outcome);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                    this.outcome.grpc_status = Some(status);
                }
            }
            Some(Err(_)) => {
                this.outcome.broken = true;
                this.finish();
            }
            None => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let ok = |status, grpc_status: Option<&str>| Outcome {
            status,
            grpc_status: grpc_status.map(Into::into),
            broken: false,
        };
        assert_eq!(ok(200, None).classification(false), "success");
        assert_eq!(ok(404, None).classification(false), "success");
        assert_eq!(ok(503, None).classification(false), "failure");
        assert_eq!(ok(200, Some("0")).classification(true), "success");
        assert_eq!(ok(200, Some("7")).classification(true), "failure");
        assert_eq!(ok(200, None).classification(true), "failure");
        let broken = Outcome {
            status: 200,
            grpc_status: None,
            broken: true,
        };
        assert_eq!(broken.classification(false), "failure");
    }
}
