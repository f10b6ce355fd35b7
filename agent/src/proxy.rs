//! The outbound proxy: listeners on 127.0.0.1 and ::1, and the life of one redirected
//! connection: accept -> original destination -> connect upstream -> forward (opaque splice)
//! -> metrics.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::BytesMut;
use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    classify::{Classified, OpaqueReason, Protocol, classify},
    config::{Config, PortSet},
    connect::Dialer,
    forward::{
        ByteCounters,
        http::{self, HttpProxy, Version},
        opaque::{self, Outcome},
        pipe::PipePool,
    },
    intercept::OriginalDstMap,
    metrics::{
        ConnectErrorLabels, DetectLabels, Direction, LookupLabels, Metrics, TcpCloseLabels,
        TcpLabels, TlsLabels, errno_name,
    },
    original_dst,
};

/// Listen backlog: the kernel caps it at net.core.somaxconn (4096 here).
const LISTEN_BACKLOG: u32 = 4096;
/// Idle pipes kept for reuse; more are created on demand and closed when returned.
const MAX_IDLE_PIPES: usize = 256;
/// Pause after an accept error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What every connection task shares.
pub struct Proxy {
    pub metrics: Arc<Metrics>,
    original_dsts: OriginalDstMap,
    pipes: PipePool,
    http: Arc<HttpProxy>,
    opaque_ports: PortSet,
    detect_timeout: Duration,
    dialer: Dialer,
}

impl Proxy {
    pub fn new(metrics: Arc<Metrics>, original_dsts: OriginalDstMap, config: &Config) -> Self {
        let dialer = Dialer {
            bypass_mark: config.bypass_mark,
            timeout: config.connect_timeout,
        };
        let http = HttpProxy {
            metrics: Arc::clone(&metrics),
            upstream_timeout: config.upstream_timeout,
            dialer,
        };
        Self {
            metrics,
            original_dsts,
            pipes: PipePool::new(MAX_IDLE_PIPES),
            http: Arc::new(http),
            opaque_ports: config.opaque_ports.clone(),
            detect_timeout: config.detect_timeout,
            dialer,
        }
    }
}

/// Binds the outbound listeners (IPv4 and IPv6 loopback) on `port`.
pub fn bind_listeners(port: u16) -> Result<Vec<TcpListener>> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    Ok(vec![bind(v4)?, bind(v6)?])
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SocketProtocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding the proxy listener {addr}"))?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    TcpListener::from_std(socket.into()).context("registering the listener")
}

/// Accepts until `shutdown` fires; every connection runs as a task on `tracker`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                tracker.spawn(handle(client, peer, Arc::clone(&proxy)));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// One redirected connection, start to finish.
async fn handle(client: TcpStream, peer: SocketAddr, proxy: Arc<Proxy>) {
    let Ok(local) = client.local_addr() else {
        return;
    };
    let (dst, lookup) = original_dst::lookup(&client, peer, local, &proxy.original_dsts);
    proxy
        .metrics
        .original_dst_lookups_total
        .get_or_create(&LookupLabels { result: lookup })
        .inc();
    let Some(dst) = dst else {
        tracing::debug!(%peer, "no original destination; not a redirected connection");
        opaque::reset(&client);
        return;
    };
    let labels = TcpLabels {
        direction: Direction::Outbound,
        target_port: dst.port(),
    };
    let metrics = &proxy.metrics;
    metrics.tcp_open_total.get_or_create(&labels).inc();
    let open = metrics.tcp_open_connections.get_or_create(&labels).clone();
    open.inc();

    // Connect before detecting: a server that speaks first must be heard at once.
    let errno = match proxy.dialer.connect(dst).await {
        Ok(server) => forward(client, server, dst, &labels, &proxy).await,
        Err(error) => {
            tracing::debug!(%peer, %dst, %error, "upstream connect failed");
            let errno = errno_name(&error);
            let connect_error = ConnectErrorLabels {
                direction: labels.direction,
                target_port: labels.target_port,
                errno,
            };
            metrics
                .tcp_connect_errors_total
                .get_or_create(&connect_error)
                .inc();
            answer_unreachable(client, &labels, &proxy).await;
            errno
        }
    };
    open.dec();
    let close = TcpCloseLabels {
        direction: labels.direction,
        target_port: labels.target_port,
        errno,
    };
    metrics.tcp_close_total.get_or_create(&close).inc();
}

/// Detects the protocol and forwards accordingly; returns the errno label of the close.
async fn forward(
    client: TcpStream,
    server: TcpStream,
    dst: SocketAddr,
    labels: &TcpLabels,
    proxy: &Proxy,
) -> &'static str {
    let classified = if proxy.opaque_ports.contains(labels.target_port) {
        Classified {
            protocol: Protocol::Opaque(OpaqueReason::OpaquePort),
            prefix: BytesMut::new(),
            elapsed: Duration::ZERO,
        }
    } else {
        classify(&client, Some(&server), proxy.detect_timeout).await
    };
    proxy.record_detection(&classified, labels);
    let counters = ByteCounters::new(&proxy.metrics, labels);
    let version = match classified.protocol {
        Protocol::Http1 => Version::Http1,
        Protocol::Http2 => Version::Http2,
        _ => return forward_opaque(client, server, &classified.prefix, &counters, proxy).await,
    };
    let _ = client.set_nodelay(true);
    let prefix = classified.prefix.freeze();
    let http = Arc::clone(&proxy.http);
    match http::forward(client, prefix, server, dst, counters, version, http).await {
        Ok(()) => "",
        Err(error) => {
            tracing::debug!(%error, "http connection ended with an error");
            http::errno_of(&error)
        }
    }
}

/// Sends the bytes detection read, then splices both ways.
async fn forward_opaque(
    client: TcpStream,
    mut server: TcpStream,
    prefix: &[u8],
    counters: &ByteCounters,
    proxy: &Proxy,
) -> &'static str {
    let _ = client.set_nodelay(true);
    if !prefix.is_empty() {
        if let Err(error) = server.write_all(prefix).await {
            opaque::reset(&client);
            return errno_name(&error);
        }
        counters.client_to_server(prefix.len() as u64);
    }
    match opaque::splice_bidirectional(client, server, &proxy.pipes, counters).await {
        Outcome::Closed => "",
        Outcome::Reset(failure) => {
            tracing::debug!(step = failure.step, error = %failure.error, "connection reset");
            errno_name(&failure.error)
        }
    }
}

/// The upstream is unreachable. An HTTP client gets 502 on each request; anything else (and
/// any opaque port) is reset, which is as close as a proxy can get to "connection refused".
async fn answer_unreachable(client: TcpStream, labels: &TcpLabels, proxy: &Proxy) {
    if proxy.opaque_ports.contains(labels.target_port) {
        opaque::reset(&client);
        return;
    }
    let classified = classify(&client, None, proxy.detect_timeout).await;
    proxy.record_detection(&classified, labels);
    let version = match classified.protocol {
        Protocol::Http1 => Version::Http1,
        Protocol::Http2 => Version::Http2,
        _ => return opaque::reset(&client),
    };
    let prefix = classified.prefix.freeze();
    if let Err(error) =
        http::serve_unavailable(client, prefix, version, Arc::clone(&proxy.http)).await
    {
        tracing::debug!(%error, "http connection to an unreachable upstream ended with an error");
    }
}

impl Proxy {
    fn record_detection(&self, classified: &Classified, tcp: &TcpLabels) {
        let labels = DetectLabels {
            direction: tcp.direction,
            result: classified.protocol.result_label(),
        };
        self.metrics.detect_total.get_or_create(&labels).inc();
        self.metrics
            .detect_duration_seconds
            .get_or_create(&labels)
            .observe(classified.elapsed.as_secs_f64());
        if let Protocol::Tls { sni } = &classified.protocol {
            let tls = TlsLabels {
                direction: tcp.direction,
                target_port: tcp.target_port,
                sni: self.metrics.sni_label(sni.as_deref()),
            };
            self.metrics.tls_connections_total.get_or_create(&tls).inc();
        }
    }
}
