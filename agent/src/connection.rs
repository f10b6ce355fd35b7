//! One redirected connection's life, start to finish: original destination -> connect ->
//! detect -> forward (HTTP or opaque) -> metrics and tap events.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    classify::{Classified, OpaqueReason, Protocol, classify},
    config::{Config, CopyMode, PortSet},
    connect::Dialer,
    forward::{
        ByteCounters,
        http::{self, ConnInfo, HttpProxy, Version},
        kernel::{Handoff, KernelForwarder},
        opaque::{self, ChattyGate, Outcome, Spliced},
        pipe::PipePool,
    },
    intercept::OriginalDstMap,
    metrics::{
        ConnectErrorLabels, DetectLabels, Direction, LookupLabels, Metrics, OpaqueModeLabels,
        TcpCloseLabels, TcpLabels, TlsLabels, errno_name,
    },
    netns::Origin,
    original_dst,
    tap::{Tap, TapEvent, now_ms},
};

/// Idle pipes kept for reuse; more are created on demand and closed when returned.
const MAX_IDLE_PIPES: usize = 256;
/// With no upstream, detection only decides between a 502 and a reset: an HTTP client sends its
/// request at once, so a silent client is reset after this long, not the full detect timeout.
const UNREACHABLE_DETECT_LIMIT: Duration = Duration::from_secs(1);

/// What every connection task shares.
pub struct Proxy {
    pub metrics: Arc<Metrics>,
    pub tap: Arc<Tap>,
    original_dsts: OriginalDstMap,
    pipes: PipePool,
    /// In-kernel forwarding of opaque connections (`--copy-mode sockmap`, when available).
    kernel: Option<Arc<KernelForwarder>>,
    http: Arc<HttpProxy>,
    opaque_ports: PortSet,
    detect_timeout: Duration,
    dialer: Dialer,
    copy_mode: CopyMode,
}

impl Proxy {
    pub fn new(
        metrics: Arc<Metrics>,
        tap: Arc<Tap>,
        original_dsts: OriginalDstMap,
        kernel: Option<Arc<KernelForwarder>>,
        config: &Config,
        draining: CancellationToken,
    ) -> Self {
        let dialer = Dialer {
            bypass_mark: config.bypass_mark,
            timeout: config.connect_timeout,
        };
        let http = HttpProxy {
            metrics: Arc::clone(&metrics),
            tap: Arc::clone(&tap),
            upstream_timeout: config.upstream_timeout,
            head_timeout: config.detect_timeout,
            dialer,
            draining,
        };
        Self {
            metrics,
            tap,
            original_dsts,
            pipes: PipePool::new(MAX_IDLE_PIPES),
            kernel,
            http: Arc::new(http),
            opaque_ports: config.opaque_ports.clone(),
            detect_timeout: config.detect_timeout,
            dialer,
            copy_mode: config.copy_mode,
        }
    }
}

/// How a connection ended, for its close metric and tap event.
struct Ended {
    protocol: &'static str,
    /// Empty for a clean close.
    errno: &'static str,
}

/// One redirected connection, start to finish. `origin` is the namespace (host or pod) whose
/// listener accepted it.
pub async fn handle(client: TcpStream, peer: SocketAddr, origin: Arc<Origin>, proxy: Arc<Proxy>) {
    let Ok(local) = client.local_addr() else {
        return;
    };
    let accepted = original_dst::Accepted {
        peer,
        local,
        netns_cookie: origin.netns_cookie,
    };
    let (dst, lookup) = original_dst::lookup(&client, &accepted, &proxy.original_dsts);
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
    let started = Instant::now();
    let workload = origin.workload.clone();
    let conn = ConnInfo {
        id: proxy.tap.connection_id(),
        dst,
        origin: Arc::clone(&origin),
        workload: workload.clone(),
    };
    proxy.tap.publish(|| TapEvent::TcpOpen {
        ts_ms: now_ms(),
        id: conn.id,
        client: peer,
        dst,
        workload: workload.clone(),
    });
    let labels = TcpLabels {
        direction: Direction::Outbound,
        target_port: dst.port(),
        workload,
    };
    let metrics = &proxy.metrics;
    metrics.tcp_open_total.get_or_create(&labels).inc();
    let open = metrics.tcp_open_connections.get_or_create(&labels).clone();
    open.inc();
    let counters = ByteCounters::new(metrics, &labels);

    // Connect before detecting: a server that speaks first must be heard at once.
    let ended = match proxy.dialer.connect(dst, &origin).await {
        Ok(server) => {
            let tap_id = conn.id;
            let ended = forward(client, server, conn, &labels, counters.clone(), &proxy).await;
            (tap_id, ended)
        }
        Err(error) => {
            tracing::debug!(%peer, %dst, %error, "upstream connect failed");
            let errno = errno_name(&error);
            let connect_error = ConnectErrorLabels {
                direction: labels.direction,
                target_port: labels.target_port,
                workload: labels.workload.clone(),
                errno,
            };
            metrics
                .tcp_connect_errors_total
                .get_or_create(&connect_error)
                .inc();
            let tap_id = conn.id;
            let protocol = answer_unreachable(client, conn, &labels, &proxy).await;
            (tap_id, Ended { protocol, errno })
        }
    };
    let (tap_id, ended) = ended;
    open.dec();
    let close = TcpCloseLabels {
        direction: labels.direction,
        target_port: labels.target_port,
        workload: labels.workload.clone(),
        errno: ended.errno,
    };
    metrics.tcp_close_total.get_or_create(&close).inc();
    proxy.tap.publish(|| TapEvent::TcpClose {
        ts_ms: now_ms(),
        id: tap_id,
        workload: labels.workload.clone(),
        client: peer,
        dst,
        protocol: ended.protocol,
        bytes_to_server: counters.total_to_server(),
        bytes_from_server: counters.total_from_server(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        errno: ended.errno,
    });
}

/// Detects the protocol and forwards accordingly.
async fn forward(
    client: TcpStream,
    server: TcpStream,
    conn: ConnInfo,
    labels: &TcpLabels,
    counters: ByteCounters,
    proxy: &Proxy,
) -> Ended {
    let classified = if proxy.opaque_ports.contains(labels.target_port) {
        Classified {
            protocol: Protocol::Opaque(OpaqueReason::OpaquePort),
            elapsed: Duration::ZERO,
        }
    } else {
        classify(&client, Some(&server), proxy.detect_timeout).await
    };
    proxy.record_detection(&classified, labels);
    let protocol = classified.protocol.result_label();
    let Some(version) = http_version(&classified.protocol) else {
        let errno = forward_opaque(client, server, &counters, proxy).await;
        return Ended { protocol, errno };
    };
    let _ = client.set_nodelay(true);
    let http = Arc::clone(&proxy.http);
    let errno = match http::forward(client, server, conn, counters, version, http).await {
        Ok(()) => "",
        Err(error) => {
            tracing::debug!(%error, "http connection ended with an error");
            error.errno()
        }
    };
    Ended { protocol, errno }
}

/// The HTTP version to proxy at request level, or None for opaque forwarding.
fn http_version(protocol: &Protocol) -> Option<Version> {
    match protocol {
        Protocol::Http1 => Some(Version::Http1),
        Protocol::Http2 => Some(Version::Http2),
        _ => None,
    }
}

/// Forwards raw bytes both ways, from the first (detection only peeked).
async fn forward_opaque(
    client: TcpStream,
    server: TcpStream,
    counters: &ByteCounters,
    proxy: &Proxy,
) -> &'static str {
    let _ = client.set_nodelay(true);
    let outcome = forward_bytes(client, server, counters, proxy).await;
    match outcome {
        Outcome::Closed => "",
        Outcome::Reset(failure) => {
            tracing::debug!(step = failure.step, error = %failure.error, "connection reset");
            errno_name(&failure.error)
        }
    }
}

/// Moves the bytes of an opaque connection. With `--copy-mode sockmap` it starts spliced and
/// is handed to the kernel once it turns out chatty (if the kernel takes it); bulk streams and
/// short connections stay spliced.
async fn forward_bytes(
    client: TcpStream,
    server: TcpStream,
    counters: &ByteCounters,
    proxy: &Proxy,
) -> Outcome {
    if proxy.copy_mode == CopyMode::Userspace {
        proxy.count_opaque_mode("userspace");
        return opaque::copy_bidirectional(client, server, counters).await;
    }
    let Some(kernel) = &proxy.kernel else {
        proxy.count_opaque_mode("splice");
        return opaque::splice_to_end(client, server, &proxy.pipes, counters).await;
    };
    let gate = ChattyGate::new();
    let (client, server) =
        match opaque::splice_bidirectional(client, server, &proxy.pipes, counters, Some(&gate))
            .await
        {
            Spliced::Done(outcome) => {
                proxy.count_opaque_mode("splice");
                return outcome;
            }
            Spliced::Chatty(client, server) => (client, server),
        };
    match kernel
        .forward(client, server, counters, || {
            proxy.count_opaque_mode("sockmap")
        })
        .await
    {
        Handoff::Forwarded(outcome) => outcome,
        Handoff::Declined(client, server) => {
            proxy.count_opaque_mode("splice");
            opaque::splice_to_end(client, server, &proxy.pipes, counters).await
        }
    }
}

/// The upstream is unreachable. An HTTP client gets 502 on each request; anything else (and
/// any opaque port) is reset, which is as close as a proxy can get to "connection refused".
/// Returns the detection result.
async fn answer_unreachable(
    client: TcpStream,
    conn: ConnInfo,
    labels: &TcpLabels,
    proxy: &Proxy,
) -> &'static str {
    if proxy.opaque_ports.contains(labels.target_port) {
        opaque::reset(&client);
        return Protocol::Opaque(OpaqueReason::OpaquePort).result_label();
    }
    let timeout = proxy.detect_timeout.min(UNREACHABLE_DETECT_LIMIT);
    let classified = classify(&client, None, timeout).await;
    proxy.record_detection(&classified, labels);
    let protocol = classified.protocol.result_label();
    let Some(version) = http_version(&classified.protocol) else {
        opaque::reset(&client);
        return protocol;
    };
    let http = Arc::clone(&proxy.http);
    if let Err(error) = http::serve_unavailable(client, version, conn, http).await {
        tracing::debug!(%error, "http connection to an unreachable upstream ended with an error");
    }
    protocol
}

impl Proxy {
    /// Forgets the original destinations recorded in a namespace the agent stopped serving.
    pub fn forget_netns(&self, netns_cookie: u64) -> usize {
        self.original_dsts.forget_netns(netns_cookie)
    }

    fn count_opaque_mode(&self, mode: &'static str) {
        self.metrics
            .opaque_connections_total
            .get_or_create(&OpaqueModeLabels { mode })
            .inc();
    }

    fn record_detection(&self, classified: &Classified, tcp: &TcpLabels) {
        let labels = DetectLabels {
            direction: tcp.direction,
            target_port: tcp.target_port,
            workload: tcp.workload.clone(),
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
                workload: tcp.workload.clone(),
                sni: self.metrics.sni_label(sni.as_deref()),
            };
            self.metrics.tls_connections_total.get_or_create(&tls).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every proxied connection's task holds this future for as long as the connection is
    /// open, idle ones included: large, rarely used states (hyper's HTTP/2 connection, an
    /// HTTP/1 exchange) are boxed so that they do not size every connection's task.
    #[test]
    fn a_connection_task_stays_small() {
        let size = future_size(handle);
        assert!(size <= 2560, "a connection's future is {size} bytes");
    }
}
