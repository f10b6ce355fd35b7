//! HTTP forwarding with request-level metrics. HTTP/1 goes through `h1`, which parses heads
//! and forwards bytes unchanged; h2c (and gRPC) through `h2`, which passes frames through
//! unchanged and follows them.
//! What both share is here: the agent-wide `HttpProxy`, the connection's `ConnInfo`, request
//! records (`observe`) and local answers. Either way
//! every request goes to the original destination over one upstream connection per client
//! connection (re-opened when the server closes it; no load balancing yet). Upgrades
//! (WebSocket 101, CONNECT 2xx) continue as a raw byte tunnel. The proxy answers itself only
//! when it must: 400 for malformed requests, 502 when the upstream is unreachable or fails,
//! 504 when its response headers take longer than the upstream timeout.

// pub(crate) for `crate::fuzzing`: the fuzz targets reach its head and body parsers.
pub(crate) mod h1;
// pub(crate) for `crate::fuzzing`: the fuzz targets reach its frame scanner and observer.
pub(crate) mod h2;
mod observe;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{ByteCounters, opaque::Outcome};
use crate::{
    connect::Dialer,
    metrics::{Direction, WorkloadLabels, http::HttpErrorLabels},
    netns::Origin,
    tap::Tap,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// What every HTTP request shares, agent-wide.
pub struct HttpProxy {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub tap: Arc<Tap>,
    pub upstream_timeout: Duration,
    /// How long an HTTP/1 request head may take once it has begun (slow-loris clients get
    /// 408 instead of holding a connection and a buffer for ever).
    pub head_timeout: Duration,
    pub dialer: Dialer,
    /// Cancelled when the agent starts shutting down: idle keep-alive connections close then,
    /// instead of holding the drain for the whole grace period.
    pub draining: CancellationToken,
}

/// How an HTTP connection failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl HttpError {
    /// The errno label for the connection's close: the socket error underneath, if any;
    /// protocol errors (already answered 400) close cleanly.
    pub fn errno(&self) -> &'static str {
        match self {
            Self::Io(error) => crate::metrics::errno_name(error),
            Self::Hyper(error) => {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
                while let Some(current) = source {
                    if let Some(io) = current.downcast_ref::<std::io::Error>() {
                        return crate::metrics::errno_name(io);
                    }
                    source = current.source();
                }
                ""
            }
        }
    }
}

/// The proxied connection an HTTP request belongs to.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The tap's connection id.
    pub id: u64,
    /// The original destination.
    pub dst: SocketAddr,
    /// The namespace the connection came from (host or pod): upstreams are dialled there.
    pub origin: Arc<Origin>,
    /// The pod's labels (empty in host mode).
    pub workload: WorkloadLabels,
    /// Outbound (a meshed client's connect) or inbound (to a meshed server).
    pub direction: Direction,
}

/// Proxies HTTP between `client` and `server`, the connection to the original destination.
pub async fn forward(
    client: TcpStream,
    server: TcpStream,
    conn: ConnInfo,
    counters: ByteCounters,
    version: Version,
    proxy: Arc<HttpProxy>,
) -> Result<(), HttpError> {
    // The HTTP/1 session inline: it is small (its exchanges, local answers and tunnel are
    // boxed), and a box of its own would cost every idle keep-alive connection more than the
    // 104 bytes it adds to every task. The HTTP/2 observer's state (two HPACK decoders) is
    // boxed: inline it would size every connection's task, opaque ones too.
    match version {
        Version::Http1 => Ok(h1::forward(client, Some((server, counters)), conn, proxy).await?),
        Version::Http2 => {
            match Box::pin(h2::forward(client, server, conn, counters, proxy)).await {
                Outcome::Closed => Ok(()),
                // Both sockets were reset, as an opaque connection's are.
                Outcome::Reset(failure) => Err(HttpError::Io(failure.error)),
            }
        }
    }
}

/// Serves an HTTP client whose upstream could not be reached: each request gets 502.
pub async fn serve_unavailable(
    client: TcpStream,
    version: Version,
    conn: ConnInfo,
    proxy: Arc<HttpProxy>,
) -> Result<(), HttpError> {
    match version {
        Version::Http1 => Ok(Box::pin(h1::forward(client, None, conn, proxy)).await?),
        Version::Http2 => Ok(Box::pin(h2::serve_unavailable(client, conn, proxy)).await?),
    }
}

impl HttpProxy {
    fn count_error(&self, conn: &ConnInfo, reason: &'static str) {
        let labels = HttpErrorLabels {
            direction: conn.direction,
            workload: conn.workload.clone(),
            reason,
        };
        self.metrics.http.errors_total.get_or_create(&labels).inc();
    }
}

/// What the in-process tests of HTTP forwarding share: loopback socket pairs and a proxy.
#[cfg(test)]
pub(crate) mod test_support {
    use std::{net::SocketAddr, sync::Arc, time::Duration};

    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::{ConnInfo, HttpProxy};
    use crate::{
        connect::Dialer,
        forward::ByteCounters,
        metrics::{Direction, Metrics, TcpLabels},
        netns::Origin,
        tap::Tap,
    };

    /// Two connected loopback sockets: (the connecting end, the accepted end). No privilege
    /// is needed, and no timer: it works on paused time.
    pub async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    /// A proxy as `Proxy::new` makes it, with no kernel behind its metrics.
    pub fn proxy(head_timeout: Duration) -> Arc<HttpProxy> {
        let metrics = Arc::new(Metrics::new(Box::new(|| Ok(Default::default()))));
        Arc::new(HttpProxy {
            metrics,
            tap: Arc::new(Tap::default()),
            upstream_timeout: Duration::from_secs(30),
            head_timeout,
            dialer: Dialer {
                bypass_mark: 0,
                timeout: Duration::from_secs(1),
                keepalive: None,
            },
            draining: CancellationToken::new(),
        })
    }

    /// The connection an HTTP request to `dst` belongs to, from the host's namespace.
    pub fn conn(dst: SocketAddr) -> ConnInfo {
        ConnInfo {
            id: 1,
            dst,
            origin: Origin::host(0),
            workload: Default::default(),
            direction: Direction::Outbound,
        }
    }

    pub fn counters(proxy: &HttpProxy, dst: SocketAddr) -> ByteCounters {
        let labels = TcpLabels {
            direction: Direction::Outbound,
            target_port: dst.port(),
            workload: Default::default(),
        };
        ByteCounters::new(&proxy.metrics, &labels)
    }

    /// How many HTTP errors of `reason` the proxy counted.
    pub fn errors(proxy: &HttpProxy, reason: &'static str) -> u64 {
        let labels = crate::metrics::http::HttpErrorLabels {
            direction: Direction::Outbound,
            reason,
            workload: Default::default(),
        };
        proxy.metrics.http.errors_total.get_or_create(&labels).get()
    }

    /// `response_total` of outbound requests to `dst` (as their authority) with these labels.
    pub fn responses(
        proxy: &HttpProxy,
        dst: SocketAddr,
        status_code: u16,
        classification: &'static str,
        grpc_status: &str,
    ) -> u64 {
        let labels = crate::metrics::http::ResponseLabels {
            direction: Direction::Outbound,
            target_port: dst.port(),
            authority: dst.to_string(),
            status_code,
            classification,
            grpc_status: grpc_status.to_string(),
            workload: Default::default(),
        };
        proxy
            .metrics
            .http
            .response_total
            .get_or_create(&labels)
            .get()
    }
}
