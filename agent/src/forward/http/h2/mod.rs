//! h2c (and gRPC) through hyper: the client's HTTP/2 connection is served by hyper's server,
//! each request goes out on one upstream HTTP/2 connection to the original destination
//! (`upstream`, re-opened when the server closes it), and upgrades (CONNECT 2xx, 101) continue
//! as a raw byte tunnel on the agent's task tracker.

mod upstream;

use std::{convert::Infallible, sync::Arc};

use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, body::Incoming, header,
    server::conn::http2 as server_h2, service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use self::upstream::Upstream;
use super::{
    AuthorityLabels, ConnInfo, HttpError, HttpProxy,
    observe::{ProxyBody, RequestSummary},
};
use crate::forward::ByteCounters;

type ClientIo = TokioIo<TcpStream>;

/// Proxies an h2c client connection to `server`, the connection to the original destination.
pub(super) async fn forward(
    client: TcpStream,
    server: TcpStream,
    conn: ConnInfo,
    counters: ByteCounters,
    proxy: Arc<HttpProxy>,
) -> Result<(), HttpError> {
    let upstream = Upstream::new(
        conn.dst,
        proxy.dialer,
        Arc::clone(&conn.origin),
        conn.direction,
        counters,
        proxy.tasks.clone(),
    )
    .with_connection(server)
    .await?;
    Ok(serve(client, conn, Some(Arc::new(upstream)), proxy).await?)
}

/// Serves an h2c client connection; with no upstream, every request gets 502.
pub(super) async fn serve(
    client: TcpStream,
    conn: ConnInfo,
    upstream: Option<Arc<Upstream>>,
    proxy: Arc<HttpProxy>,
) -> Result<(), hyper::Error> {
    let client_io: ClientIo = TokioIo::new(client);
    let service_proxy = Arc::clone(&proxy);
    let authorities = Arc::new(AuthorityLabels::default());
    let service_conn = conn.clone();
    let service = service_fn(move |request| {
        let (upstream, proxy) = (upstream.clone(), Arc::clone(&service_proxy));
        let authorities = Arc::clone(&authorities);
        let conn = service_conn.clone();
        async move {
            let response = proxy
                .handle(request, &conn, &authorities, upstream.as_deref())
                .await;
            Ok::<_, Infallible>(response)
        }
    });
    let connection =
        server_h2::Builder::new(TokioExecutor::new()).serve_connection(client_io, service);
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
    /// One request: to the upstream, or answered 502 when there is none.
    async fn handle(
        &self,
        mut request: Request<Incoming>,
        conn: &ConnInfo,
        authorities: &AuthorityLabels,
        upstream: Option<&Upstream>,
    ) -> Response<ProxyBody> {
        let raw_authority = authority_of(&request);
        let authority = authorities.label(raw_authority, &self.metrics.http);
        let record = self.begin_record(conn.clone(), authority, is_grpc(request.headers()), || {
            RequestSummary {
                method: request.method().to_string(),
                authority: raw_authority.to_string(),
                path: request.uri().path().to_string(),
            }
        });
        let Some(upstream) = upstream else {
            self.count_error(conn, "upstream_unavailable");
            return record.local_response(StatusCode::BAD_GATEWAY);
        };
        let client_upgrade = wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let is_connect = request.method() == Method::CONNECT;
        let mut response =
            match tokio::time::timeout(self.upstream_timeout, upstream.send(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "upstream request failed");
                    self.count_error(conn, "upstream_unavailable");
                    return record.local_response(StatusCode::BAD_GATEWAY);
                }
                Err(_) => {
                    self.count_error(conn, "upstream_timeout");
                    return record.local_response(StatusCode::GATEWAY_TIMEOUT);
                }
            };
        let tunnel = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (is_connect && response.status().is_success());
        if let (true, Some(client_upgrade)) = (tunnel, client_upgrade) {
            let server_upgrade = hyper::upgrade::on(&mut response);
            self.tasks
                .spawn(tunnel_upgraded(client_upgrade, server_upgrade));
        }
        record.upstream(response)
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

fn wants_upgrade(request: &Request<Incoming>) -> bool {
    request.method() == Method::CONNECT || request.headers().contains_key(header::UPGRADE)
}
