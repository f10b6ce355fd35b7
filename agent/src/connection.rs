//! One proxied connection's life, start to finish: original destination -> connect ->
//! detect -> forward (HTTP or opaque) -> metrics and tap events. Outbound (a meshed client's
//! redirected connect) and inbound (sk_lookup steered a connection to a meshed server) take
//! the same path; they differ only in where the destination comes from and how it is dialled.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::ConnTuple;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    accel::{AccelLink, Accelerator},
    classify::{Classified, OpaqueReason, Protocol, classify},
    close::CloseReason,
    config::{Config, PortSet},
    connect::Dialer,
    forward::{
        ByteCounters, OpaqueForwarding,
        http::{self, ConnInfo, HttpProxy, Version},
        kernel::KernelForwarder,
        opaque,
    },
    intercept::{Inbound, OriginalDstMap},
    liveness::OpenInbound,
    metrics::{
        ConnectErrorLabels, DetectLabels, Direction, LookupLabels, Metrics, OpaqueModeLabels,
        TcpCloseLabels, TcpLabels, TlsLabels, errno_name,
    },
    netns::Origin,
    original_dst,
    tap::{Tap, TapEvent, now_ms},
};

/// A connection in `tcp_open_connections`, for as long as its task lives. A task dropped
/// before it finished (a removed pod's drain ran out, or the agent's grace period) still
/// leaves the gauge and counts its close, as `errno="ECONNABORTED"`: the agent cut it.
struct OpenConnection<'a> {
    metrics: &'a Metrics,
    labels: &'a TcpLabels,
    open: bool,
}

impl<'a> OpenConnection<'a> {
    fn count(metrics: &'a Metrics, labels: &'a TcpLabels) -> Self {
        metrics.tcp_open_connections.get_or_create(labels).inc();
        Self {
            metrics,
            labels,
            open: true,
        }
    }

    /// The connection ended on its own; its close is counted by the caller, with its reason.
    fn closed(mut self) {
        self.leave();
    }

    fn leave(&mut self) {
        if std::mem::take(&mut self.open) {
            self.metrics
                .tcp_open_connections
                .get_or_create(self.labels)
                .dec();
        }
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        self.leave();
        let close = TcpCloseLabels {
            direction: self.labels.direction,
            target_port: self.labels.target_port,
            errno: "ECONNABORTED",
            workload: self.labels.workload.clone(),
        };
        self.metrics.tcp_close_total.get_or_create(&close).inc();
    }
}

/// With no upstream, detection only decides between a 502 and a reset: an HTTP client sends its
/// request at once, so a silent client is reset after this long, not the full detect timeout.
const UNREACHABLE_DETECT_LIMIT: Duration = Duration::from_secs(1);

/// What every connection task shares.
pub struct Proxy {
    pub metrics: Arc<Metrics>,
    pub tap: Arc<Tap>,
    original_dsts: OriginalDstMap,
    /// Whether the agent runs inside the meshed cgroup, where the getsockopt hook answers
    /// SO_ORIGINAL_DST on its own sockets.
    agent_is_meshed: bool,
    /// The meshed listeners: which cgroup an inbound connection's workload is in.
    inbound: Arc<Inbound>,
    /// How opaque connections move their bytes.
    opaque: OpaqueForwarding,
    /// `--accelerate local`: pairs opaque-port connections with the application's socket.
    accelerator: Option<Arc<Accelerator>>,
    http: Arc<HttpProxy>,
    opaque_ports: PortSet,
    detect_timeout: Duration,
    dialer: Dialer,
    /// The inbound listener's own port: a connection addressed to it came straight to the
    /// agent, not steered by sk_lookup, and has no workload behind it.
    inbound_port: u16,
    /// Inbound connections open now: they count against the same budget as redirected
    /// connects (the liveness publisher hands the count to the kernel).
    pub open_inbound: OpenInbound,
}

impl Proxy {
    /// TCP keepalive for the agent's sockets, the listeners' included (None: off).
    pub fn keepalive(&self) -> Option<Duration> {
        self.dialer.keepalive
    }

    pub fn new(
        metrics: Arc<Metrics>,
        tap: Arc<Tap>,
        maps: KernelMaps,
        kernel: Option<Arc<KernelForwarder>>,
        config: &Config,
        draining: CancellationToken,
    ) -> Self {
        let dialer = Dialer {
            bypass_mark: config.bypass_mark,
            timeout: config.connect_timeout,
            keepalive: (!config.tcp_keepalive.is_zero()).then_some(config.tcp_keepalive),
        };
        let http = HttpProxy {
            metrics: Arc::clone(&metrics),
            tap: Arc::clone(&tap),
            upstream_timeout: config.upstream_timeout,
            head_timeout: config.detect_timeout,
            dialer,
            draining,
        };
        let opaque = OpaqueForwarding::new(
            config.copy_mode,
            kernel,
            config.sockmap_connections,
            metrics.opaque_busy_connections.clone(),
        );
        Self {
            metrics,
            tap,
            original_dsts: maps.original_dsts,
            agent_is_meshed: crate::cgroup::own_cgroup_within(&config.cgroup),
            inbound: maps.inbound,
            opaque,
            accelerator: maps.accelerator,
            http: Arc::new(http),
            opaque_ports: config.opaque_ports.clone(),
            detect_timeout: config.detect_timeout,
            dialer,
            inbound_port: config.inbound_port,
            open_inbound: OpenInbound::default(),
        }
    }

    /// Whether opaque connections' activity needs sweeping (they may go to the kernel).
    pub fn sweeps_activity(&self) -> bool {
        self.opaque.hands_off_to_the_kernel()
    }

    /// Brings the count of busy opaque connections (the kernel hand-off's rule, and its gauge)
    /// up to date.
    pub fn sweep_activity(&self) {
        self.opaque.sweep_activity();
    }
}

/// The maps the proxy reads about each connection it accepts.
pub struct KernelMaps {
    pub original_dsts: OriginalDstMap,
    pub inbound: Arc<Inbound>,
    /// `--accelerate local`.
    pub accelerator: Option<Arc<Accelerator>>,
}

/// Where an accepted connection goes, and for whom.
struct Target {
    dst: SocketAddr,
    /// cgroup v2 id of the workload (the client outbound, the server inbound), when known.
    workload_cgroup: Option<u64>,
    /// Outbound: the connection as the application's socket sees it (its key in the kernel's
    /// maps).
    app_tuple: Option<ConnTuple>,
}

/// Where a connection goes and how, decided before its first byte moves.
struct Routed {
    dst: SocketAddr,
    opaque_port: bool,
    /// `--accelerate local`: paired with the application's socket (boxed: rarely there, and
    /// held for the connection's life).
    accelerated: Option<Box<AccelLink>>,
}

/// How a connection reached the agent.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    /// The client's address.
    pub peer: SocketAddr,
    /// The address of the listener that accepted it. An outbound connection's own local
    /// address is its listener's (bound to one loopback address), so it is known without a
    /// getsockname; an inbound one's is the workload's, as sk_lookup left it.
    pub listener: SocketAddr,
    pub direction: Direction,
}

/// One proxied connection, start to finish. `origin` is the namespace (host or pod) whose
/// listener accepted it.
pub async fn handle(client: TcpStream, accepted: Accepted, origin: Arc<Origin>, proxy: Arc<Proxy>) {
    let Accepted {
        peer, direction, ..
    } = accepted;
    let _counted = (direction == Direction::Inbound).then(|| proxy.open_inbound.hold());
    let Some(Routed {
        dst,
        opaque_port,
        accelerated,
    }) = proxy.route(&client, accepted, &origin)
    else {
        tracing::debug!(%peer, ?direction, "no original destination; not a proxied connection");
        opaque::reset(&client);
        return;
    };
    let started = Instant::now();
    let conn = ConnInfo {
        id: proxy.tap.connection_id(),
        dst,
        origin: Arc::clone(&origin),
        workload: origin.workload.clone(),
        direction,
    };
    let id = conn.id;
    proxy.tap.publish(|| TapEvent::TcpOpen {
        ts_ms: now_ms(),
        id,
        direction,
        client: peer,
        dst,
        workload: conn.workload.clone(),
    });
    let labels = TcpLabels {
        direction,
        target_port: dst.port(),
        workload: conn.workload.clone(),
    };
    let metrics = &proxy.metrics;
    metrics.tcp_open_total.get_or_create(&labels).inc();
    let open = OpenConnection::count(metrics, &labels);
    let counters = ByteCounters::new(metrics, &labels);

    // Connect before detecting: a server that speaks first must be heard at once.
    let (protocol, reason) = match proxy.dialer.connect(dst, &origin, direction).await {
        Ok(server) => {
            let streams = (client, server);
            let opaque = if let Some(link) = accelerated {
                OpaquePath::Accelerated(link)
            } else if opaque_port {
                OpaquePath::Port
            } else {
                OpaquePath::Detect
            };
            forward(streams, conn, opaque, &labels, counters.clone(), &proxy).await
        }
        Err(error) => {
            proxy.count_connect_error(&labels, &error);
            let protocol = answer_unreachable(client, conn, opaque_port, &labels, &proxy).await;
            (protocol, CloseReason::ConnectFailed(error))
        }
    };
    open.closed();
    reason.log(id, peer, dst);
    let errno = reason.errno();
    let close = TcpCloseLabels {
        direction: labels.direction,
        target_port: labels.target_port,
        errno,
        workload: labels.workload.clone(),
    };
    metrics.tcp_close_total.get_or_create(&close).inc();
    proxy.tap.publish(|| TapEvent::TcpClose {
        ts_ms: now_ms(),
        id,
        direction,
        workload: labels.workload.clone(),
        client: peer,
        dst,
        protocol,
        bytes_to_server: counters.total_to_server(),
        bytes_from_server: counters.total_from_server(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        errno,
    });
}

/// Whether a connection is opaque from the start, and how its bytes move then.
enum OpaquePath {
    /// Not known yet: detect the protocol.
    Detect,
    /// An opaque port.
    Port,
    /// An opaque port, paired with the application's socket (`--accelerate local`). Boxed,
    /// like the copy it leads to: an experimental path must not size every connection's task.
    Accelerated(Box<AccelLink>),
}

/// Detects the protocol and forwards accordingly. Returns the detection result and how the
/// connection ended.
async fn forward(
    (client, server): (TcpStream, TcpStream),
    conn: ConnInfo,
    opaque: OpaquePath,
    labels: &TcpLabels,
    counters: ByteCounters,
    proxy: &Proxy,
) -> (&'static str, CloseReason) {
    if let OpaquePath::Accelerated(link) = opaque {
        proxy.record_detection(&opaque_port(), labels);
        proxy.count_opaque_mode("accelerated");
        let outcome = Box::pin(
            proxy
                .opaque
                .forward_accelerated(client, server, &counters, &link),
        )
        .await;
        return (opaque_port().protocol.result_label(), outcome.into());
    }
    let classified = if matches!(opaque, OpaquePath::Port) {
        opaque_port()
    } else {
        classify(&client, Some(&server), proxy.detect_timeout).await
    };
    proxy.record_detection(&classified, labels);
    let protocol = classified.protocol.result_label();
    if classified.protocol == Protocol::Opaque(OpaqueReason::Error) {
        return (protocol, pass_on_client_failure(&client, &server));
    }
    // TCP_NODELAY came with the accepted socket: the listener has it (accept.rs).
    let Some(version) = http_version(&classified.protocol) else {
        // Raw bytes both ways, from the first (detection only peeked).
        let outcome = proxy
            .opaque
            .forward(client, server, &counters, |mode| {
                proxy.count_opaque_mode(mode)
            })
            .await;
        return (protocol, outcome.into());
    };
    let http = Arc::clone(&proxy.http);
    let result = http::forward(client, server, conn, counters, version, http).await;
    (protocol, result.into())
}

/// What detection says of a connection to an opaque port, without looking.
fn opaque_port() -> Classified {
    Classified {
        protocol: Protocol::Opaque(OpaqueReason::OpaquePort),
        elapsed: Duration::ZERO,
    }
}

/// The client's socket failed during detection (a reset before its first byte, typically):
/// the server gets a reset too, as it would have directly, not a clean end of stream.
fn pass_on_client_failure(client: &TcpStream, server: &TcpStream) -> CloseReason {
    crate::forward::opaque::reset(server);
    let error = client
        .take_error()
        .ok()
        .flatten()
        .unwrap_or_else(|| std::io::ErrorKind::ConnectionReset.into());
    CloseReason::Reset(crate::forward::opaque::Failure {
        step: "detecting",
        error,
    })
}

/// The HTTP version to proxy at request level, or None for opaque forwarding.
fn http_version(protocol: &Protocol) -> Option<Version> {
    match protocol {
        Protocol::Http1 => Some(Version::Http1),
        Protocol::Http2 => Some(Version::Http2),
        _ => None,
    }
}

/// The upstream is unreachable. An HTTP client gets 502 on each request; anything else (and
/// any opaque port) is reset, which is as close as a proxy can get to "connection refused".
/// Returns the detection result.
async fn answer_unreachable(
    client: TcpStream,
    conn: ConnInfo,
    opaque_port: bool,
    labels: &TcpLabels,
    proxy: &Proxy,
) -> &'static str {
    if opaque_port {
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
    /// Where an accepted connection was going (and counts how that was found out).
    /// The destination, whether it is an opaque port, and (`--accelerate local`) the pairing.
    fn route(
        &self,
        client: &TcpStream,
        accepted: Accepted,
        origin: &Arc<Origin>,
    ) -> Option<Routed> {
        let Target {
            dst,
            workload_cgroup,
            app_tuple,
        } = match accepted.direction {
            Direction::Outbound => self.original_dst(client, accepted, origin),
            Direction::Inbound => self.inbound_target(client, origin),
        }?;
        let opaque_port = self.is_opaque(origin, workload_cgroup, dst.port());
        let accelerated = self
            .accelerate(client, app_tuple, origin, opaque_port)
            .map(Box::new);
        Some(Routed {
            dst,
            opaque_port,
            accelerated,
        })
    }

    fn original_dst(
        &self,
        client: &TcpStream,
        accepted: Accepted,
        origin: &Origin,
    ) -> Option<Target> {
        let accepted = original_dst::Accepted {
            peer: accepted.peer,
            local: accepted.listener,
            netns_cookie: origin.netns_cookie,
        };
        let (found, lookup) =
            original_dst::lookup(client, &accepted, &self.original_dsts, self.agent_is_meshed);
        self.metrics
            .original_dst_lookups_total
            .get_or_create(&LookupLabels {
                result: lookup.as_str(),
            })
            .inc();
        found.map(|found| Target {
            dst: found.dst,
            workload_cgroup: Some(found.cgroup).filter(|&cgroup| cgroup != 0),
            app_tuple: Some(original_dst::conn_tuple(&accepted)),
        })
    }

    /// `--accelerate local`: pairs an opaque-port connection with the application's socket, or
    /// takes the application's socket out of the fast path. Before anything is read from or
    /// written to `client`. The link, if paired.
    fn accelerate(
        &self,
        client: &TcpStream,
        app: Option<ConnTuple>,
        origin: &Arc<Origin>,
        opaque_port: bool,
    ) -> Option<AccelLink> {
        let (Some(accelerator), Some(app)) = (&self.accelerator, app) else {
            return None;
        };
        if opaque_port {
            accelerator.pair(client, app, Arc::clone(origin))
        } else {
            accelerator.release(app);
            None
        }
    }

    /// Opaque ports: the node-wide list plus the workload's policy (its pod's, or in host mode
    /// its cgroup's).
    fn is_opaque(&self, origin: &Origin, workload_cgroup: Option<u64>, port: u16) -> bool {
        self.opaque_ports.contains(port) || origin.policy_opaque(port, workload_cgroup)
    }

    /// Where an inbound connection was going: sk_lookup keeps its addresses, so the accepted
    /// socket's own address is the workload's. None for one addressed to the inbound port
    /// itself, which would only loop back to the agent. The workload's cgroup is its
    /// listener's, looked up only where some cgroup has a policy of its own.
    fn inbound_target(&self, client: &TcpStream, origin: &Origin) -> Option<Target> {
        let local = client.local_addr().ok()?;
        let dst = SocketAddr::new(local.ip().to_canonical(), local.port());
        if dst.port() == self.inbound_port {
            return None;
        }
        let workload_cgroup = origin
            .has_cgroup_opaque_ports()
            .then(|| {
                self.inbound
                    .listener_cgroup(origin.netns_cookie, dst.port())
            })
            .flatten();
        Some(Target {
            dst,
            workload_cgroup,
            app_tuple: None,
        })
    }

    fn count_connect_error(&self, labels: &TcpLabels, error: &std::io::Error) {
        let connect_error = ConnectErrorLabels {
            direction: labels.direction,
            target_port: labels.target_port,
            errno: errno_name(error),
            workload: labels.workload.clone(),
        };
        self.metrics
            .tcp_connect_errors_total
            .get_or_create(&connect_error)
            .inc();
    }

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
    /// open, idle ones included: states only some connections reach (the HTTP/2 observer, the
    /// user-space copy, the kernel hand-off, `--accelerate local`, an HTTP/1 exchange) are
    /// boxed so that they do not size every connection's task. 1,984 bytes in a debug build
    /// (1,896 in release); the bound leaves little room, so that growth is noticed (an inline
    /// copy once grew every connection by 216 bytes unseen: `--accelerate local`'s hooks and
    /// timers in it).
    #[test]
    fn a_connection_task_stays_small() {
        let size = future_size(handle);
        assert!(size <= 2048, "a connection's future is {size} bytes");
    }
}
