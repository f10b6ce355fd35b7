//! Metrics: typed label sets and metric families, exposed by the admin server in the
//! Prometheus/OpenMetrics text format (prometheus-client). Names follow Linkerd's proxy so
//! existing dashboards work. Labels are bounded: direction is a closed enum, target_port has at
//! most 65536 values, errno is one of a fixed list of names.

mod family;
pub mod http;
mod process;

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, OnceLock},
};

use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use self::{family::Family, http::HttpMetrics};
use agent_common::KernelCounters;

/// Why the kernel's counters could not be read (the source's own error, boxed: metrics knows
/// nothing of the kernel programs).
pub type KernelCounterError = Box<dyn std::error::Error + Send + Sync>;

/// Reads the kernel's counters (summed over CPUs) at scrape time.
pub type KernelCounterSource =
    Box<dyn Fn() -> Result<KernelCounters, KernelCounterError> + Send + Sync>;

/// Distinct TLS server names before new ones are reported as "other".
pub const MAX_SNIS: usize = 100;

/// Detection durations, in seconds: from sub-millisecond to the 10 s default timeout.
const DETECT_BUCKETS_S: [f64; 10] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// A label value many series share without copying it (namespace and pod names).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct SharedLabel(Arc<str>);

impl SharedLabel {
    pub fn new(value: &str) -> Self {
        Self(Arc::from(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for SharedLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, &self.0)
    }
}

impl serde::Serialize for SharedLabel {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// The workload a connection belongs to: its pod's Kubernetes namespace and name, both empty
/// in host mode. Bounded by the pods the agent serves (at most `MAX_SERVED_NETNS`) and those
/// removed within `--pod-metrics-retention` (`Metrics::forget_workload`).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet, serde::Serialize)]
pub struct WorkloadLabels {
    pub namespace: SharedLabel,
    pub pod: SharedLabel,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A meshed process's connect (connect4/6 redirect).
    Outbound,
    /// A connection to a meshed process's listening port (sk_lookup).
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Labels of every per-connection TCP metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: Direction,
    pub target_port: u16,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpCloseLabels {
    pub direction: Direction,
    pub target_port: u16,
    /// Empty for a clean close, else the errno name (ECONNRESET, ...).
    pub errno: &'static str,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

/// Enum label values render as their lowercase names.
macro_rules! label_value_as_str {
    ($($name:ty),+) => {$(
        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )+};
}

label_value_as_str!(Direction);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// getsockopt, map or not_found (`original_dst::Lookup`)
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectErrorLabels {
    pub direction: Direction,
    pub target_port: u16,
    pub errno: &'static str,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: Direction,
    pub target_port: u16,
    /// http1, http2, tls, opaque, opaque_port, server_first, timeout, error
    pub result: &'static str,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptErrorLabels {
    pub errno: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpaqueModeLabels {
    /// sockmap, splice or userspace
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub direction: Direction,
    pub target_port: u16,
    /// The ClientHello's server name (bounded, sanitized); empty when there was none.
    pub sni: String,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

/// Every metric family of the agent, plus the registry that renders them.
pub struct Metrics {
    registry: Registry,
    pub tcp_open_total: Family<TcpLabels, Counter>,
    pub tcp_open_connections: Family<TcpLabels, Gauge>,
    /// Bytes the proxy read from the destination (server -> client).
    pub tcp_read_bytes_total: Family<TcpLabels, Counter>,
    /// Bytes the proxy wrote to the destination (client -> server).
    pub tcp_write_bytes_total: Family<TcpLabels, Counter>,
    pub tcp_close_total: Family<TcpCloseLabels, Counter>,
    pub tcp_connect_errors_total: Family<ConnectErrorLabels, Counter>,
    pub original_dst_lookups_total: Family<LookupLabels, Counter>,
    pub detect_total: Family<DetectLabels, Counter>,
    pub detect_duration_seconds: Family<DetectLabels, Histogram>,
    pub tls_connections_total: Family<TlsLabels, Counter>,
    pub opaque_connections_total: Family<OpaqueModeLabels, Counter>,
    /// Opaque connections that moved bytes within about the last second (`--copy-mode sockmap`).
    pub opaque_busy_connections: Gauge,
    /// Pods served in their own network namespaces (pod mode).
    pub served_pods: Gauge,
    /// The connection budget the kernel enforces, and the redirected connections open now.
    pub connection_budget: Gauge,
    pub open_redirects: Gauge,
    /// `--accelerate local`: other programs' socket maps loaded now (the fast path pauses).
    pub accelerate_foreign_socket_maps: Gauge,
    pub accept_errors_total: Family<AcceptErrorLabels, Counter>,
    /// Original destinations of connections that ended before the agent accepted them, removed.
    pub unaccepted_removed_total: Counter,
    /// Loads of the policy file (the first at start included), by result.
    pub policy_reload_total: Family<ReloadLabels, Counter>,
    pub http: HttpMetrics,
    snis: BoundedLabel,
    /// Brings counters kept elsewhere (the kernel's) up to date before each render.
    before_render: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Metrics {
    pub fn new(kernel: KernelCounterSource) -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            tcp_open_total: Family::default(),
            tcp_open_connections: Family::default(),
            tcp_read_bytes_total: Family::default(),
            tcp_write_bytes_total: Family::default(),
            tcp_close_total: Family::default(),
            tcp_connect_errors_total: Family::default(),
            original_dst_lookups_total: Family::default(),
            detect_total: Family::default(),
            detect_duration_seconds: Family::new_with_constructor(|| {
                Histogram::new(DETECT_BUCKETS_S)
            }),
            tls_connections_total: Family::default(),
            opaque_connections_total: Family::default(),
            opaque_busy_connections: Gauge::default(),
            served_pods: Gauge::default(),
            connection_budget: Gauge::default(),
            open_redirects: Gauge::default(),
            accelerate_foreign_socket_maps: Gauge::default(),
            accept_errors_total: Family::default(),
            unaccepted_removed_total: Counter::default(),
            policy_reload_total: Family::default(),
            http: HttpMetrics::register(&mut registry),
            snis: BoundedLabel::new(MAX_SNIS),
            registry: Registry::default(),
            before_render: OnceLock::new(),
        };
        registry.register(
            "tcp_open",
            "TCP connections opened through the proxy",
            metrics.tcp_open_total.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "TCP connections currently open through the proxy",
            metrics.tcp_open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from destinations (server to client)",
            metrics.tcp_read_bytes_total.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to destinations (client to server)",
            metrics.tcp_write_bytes_total.clone(),
        );
        registry.register(
            "tcp_close",
            "TCP connections closed, by errno (empty when clean)",
            metrics.tcp_close_total.clone(),
        );
        registry.register(
            "tcp_connect_errors",
            "Upstream connects that failed; the client connection was reset",
            metrics.tcp_connect_errors_total.clone(),
        );
        registry.register(
            "sockmesh_original_dst_lookups",
            "Original-destination lookups on accepted connections, by how they resolved",
            metrics.original_dst_lookups_total.clone(),
        );
        registry.register(
            "tcp_detect",
            "Protocol detection results of proxied connections",
            metrics.detect_total.clone(),
        );
        registry.register(
            "sockmesh_detect_duration_seconds",
            "Time from accept to the detection decision",
            metrics.detect_duration_seconds.clone(),
        );
        registry.register(
            "sockmesh_tls_connections",
            "Connections detected as TLS (forwarded opaquely), by server name",
            metrics.tls_connections_total.clone(),
        );
        registry.register(
            "sockmesh_opaque_connections",
            "Opaque connections by how their bytes were forwarded (sockmap, splice, userspace)",
            metrics.opaque_connections_total.clone(),
        );
        registry.register(
            "sockmesh_opaque_busy_connections",
            "Opaque connections that moved bytes within about the last second; chatty ones go to the kernel only while at most --sockmap-connections are",
            metrics.opaque_busy_connections.clone(),
        );
        registry.register(
            "sockmesh_policy_reload",
            "Loads of the policy file (--policy) by result: a bad file keeps the last good policy",
            metrics.policy_reload_total.clone(),
        );
        registry.register(
            "sockmesh_served_pods",
            "Pods the agent serves in their own network namespaces (pod mode)",
            metrics.served_pods.clone(),
        );
        registry.register(
            "sockmesh_connection_budget",
            "Redirected connections the agent takes at once; beyond it the kernel sends connects direct",
            metrics.connection_budget.clone(),
        );
        registry.register(
            "sockmesh_open_redirects",
            "Redirected client connections open now, as the kernel counts them",
            metrics.open_redirects.clone(),
        );
        registry.register(
            "sockmesh_accelerate_foreign_socket_maps",
            "With --accelerate local: socket maps of other programs loaded on the node; new connections are not accelerated while any is",
            metrics.accelerate_foreign_socket_maps.clone(),
        );
        registry.register(
            "sockmesh_accept_errors",
            "Failed accepts on the proxy listeners, by errno (retried with a capped backoff)",
            metrics.accept_errors_total.clone(),
        );
        registry.register(
            "sockmesh_unaccepted_removed",
            "Original destinations of redirected connections that ended before the agent accepted them, removed from ORIG_BY_TUPLE",
            metrics.unaccepted_removed_total.clone(),
        );
        registry.register_collector(Box::new(KernelCollector(kernel)));
        registry.register_collector(Box::new(process::ProcessCollector));
        Self {
            registry,
            ..metrics
        }
    }

    /// Removes every series of `workload` (a pod the agent no longer serves); returns how many
    /// went. Host-mode series (empty workload) are never removed.
    pub fn forget_workload(&self, workload: &WorkloadLabels) -> usize {
        if *workload == WorkloadLabels::default() {
            return 0;
        }
        let other = |labels: &WorkloadLabels| labels != workload;
        self.tcp_open_total.retain(|l| other(&l.workload))
            + self.tcp_open_connections.retain(|l| other(&l.workload))
            + self.tcp_read_bytes_total.retain(|l| other(&l.workload))
            + self.tcp_write_bytes_total.retain(|l| other(&l.workload))
            + self.tcp_close_total.retain(|l| other(&l.workload))
            + self.tcp_connect_errors_total.retain(|l| other(&l.workload))
            + self.detect_total.retain(|l| other(&l.workload))
            + self.detect_duration_seconds.retain(|l| other(&l.workload))
            + self.tls_connections_total.retain(|l| other(&l.workload))
            + self.http.forget_workload(workload)
    }

    /// The sni label for a ClientHello's server name (bounded).
    pub fn sni_label(&self, sni: Option<&str>) -> String {
        sni.map(|name| self.snis.label(name)).unwrap_or_default()
    }

    /// Runs `refresh` before every render (set once; later calls are ignored).
    pub fn refresh_before_render(&self, refresh: Box<dyn Fn() + Send + Sync>) {
        let _ = self.before_render.set(refresh);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String, fmt::Error> {
        if let Some(refresh) = self.before_render.get() {
            refresh();
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Reads the kernel's per-CPU counters at scrape time.
struct KernelCollector(KernelCounterSource);

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counters = match (self.0)() {
            Ok(counters) => counters,
            Err(error) => {
                tracing::warn!(
                    error = ErrorChain(&*error).to_string(),
                    "reading kernel counters"
                );
                return Ok(());
            }
        };
        let decisions = [
            ("redirected", counters.redirected),
            ("bypassed_port", counters.bypassed_port),
            ("bypassed_network", counters.bypassed_network),
            ("bypassed_self", counters.bypassed_self),
            ("bypassed_unserved_netns", counters.bypassed_unserved_netns),
            (
                "bypassed_agent_unresponsive",
                counters.bypassed_agent_unresponsive,
            ),
            ("bypassed_over_capacity", counters.bypassed_over_capacity),
            (
                "bypassed_unmeshed_workload",
                counters.bypassed_unmeshed_workload,
            ),
        ];
        let probe = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "sockmesh_kernel_connects",
            "TCP connects seen by the cgroup connect4/6 programs, by decision",
            None,
            probe.metric_type(),
        )?;
        for (decision, value) in decisions {
            let labels = DecisionLabels { decision };
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let inbound = [
            ("redirected", counters.inbound_redirected),
            ("bypassed_port", counters.inbound_bypassed_port),
            (
                "bypassed_agent_unresponsive",
                counters.inbound_bypassed_agent_unresponsive,
            ),
            (
                "bypassed_over_capacity",
                counters.inbound_bypassed_over_capacity,
            ),
        ];
        let mut family = encoder.encode_descriptor(
            "sockmesh_kernel_inbound",
            "Connections to meshed listening ports seen by the sk_lookup programs, by decision",
            None,
            probe.metric_type(),
        )?;
        for (decision, value) in inbound {
            let labels = DecisionLabels { decision };
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let accelerated = [
            ("redirected", counters.accel_redirected),
            ("fell_back", counters.accel_fell_back),
        ];
        let mut family = encoder.encode_descriptor(
            "sockmesh_kernel_accelerate",
            "--accelerate local: socket directions that started redirecting, application \
             sockets that fell back to TCP at the bound",
            None,
            probe.metric_type(),
        )?;
        for (decision, value) in accelerated {
            let labels = DecisionLabels { decision };
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let errors = ConstCounter::new(counters.errors);
        let metric = encoder.encode_descriptor(
            "sockmesh_kernel_errors",
            "Kernel map updates that failed; the connect went direct (fail-open)",
            None,
            errors.metric_type(),
        )?;
        errors.encode(metric)
    }
}

/// A label whose values come from the network (authorities, server names): the first `max`
/// distinct values are kept, later ones become "other"; values with characters outside a
/// host[:port] are "invalid".
pub struct BoundedLabel {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl BoundedLabel {
    pub fn new(max: usize) -> Self {
        Self {
            seen: Mutex::new(HashSet::new()),
            max,
        }
    }

    pub fn label(&self, value: &str) -> String {
        let clean = sanitize_host(value);
        let mut seen = self.seen.lock();
        if seen.contains(&clean) {
            return clean;
        }
        if seen.len() < self.max {
            seen.insert(clean.clone());
            return clean;
        }
        "other".to_string()
    }
}

/// Lowercase host[:port] characters only; anything else would be a hostile label value.
fn sanitize_host(value: &str) -> String {
    let lower = value.trim().to_ascii_lowercase();
    let valid = !lower.is_empty()
        && lower.len() <= 253
        && lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
    if valid { lower } else { "invalid".to_string() }
}

/// An error and every source under it, joined by ": " (the one-line form logs and answers use).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// A bounded errno label: the name of common socket errors, "EOTHER" for the rest.
pub fn errno_name(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNABORTED) => "ECONNABORTED",
        Some(libc::EPIPE) => "EPIPE",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::ENOBUFS) => "ENOBUFS",
        Some(libc::ENOMEM) => "ENOMEM",
        _ if error.kind() == std::io::ErrorKind::TimedOut => "ETIMEDOUT",
        _ => "EOTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_are_bounded() {
        let reset = std::io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(errno_name(&reset), "ECONNRESET");
        let odd = std::io::Error::from_raw_os_error(libc::EXDEV);
        assert_eq!(errno_name(&odd), "EOTHER");
        let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(errno_name(&timeout), "ETIMEDOUT");
    }

    fn pod(name: &str) -> WorkloadLabels {
        WorkloadLabels {
            namespace: SharedLabel::new("shop"),
            pod: SharedLabel::new(name),
        }
    }

    #[test]
    fn a_forgotten_workload_leaves_no_series_and_the_others_stay() {
        let metrics = Metrics::new(Box::new(|| Ok(KernelCounters::default())));
        for workload in [pod("cart-1"), pod("cart-2"), WorkloadLabels::default()] {
            let tcp = TcpLabels {
                direction: Direction::Outbound,
                target_port: 8080,
                workload: workload.clone(),
            };
            metrics.tcp_open_total.get_or_create(&tcp).inc();
            metrics.tcp_read_bytes_total.get_or_create(&tcp).inc_by(10);
            let request = http::RequestLabels {
                direction: Direction::Outbound,
                target_port: 8080,
                authority: "api.test".into(),
                workload,
            };
            metrics.http.request_total.get_or_create(&request).inc();
        }
        assert_eq!(metrics.forget_workload(&pod("cart-1")), 3);
        // Host mode's series are not a pod's: never forgotten.
        assert_eq!(metrics.forget_workload(&WorkloadLabels::default()), 0);
        let text = metrics.render().unwrap();
        assert!(!text.contains(r#"pod="cart-1""#), "{text}");
        assert!(
            text.contains(r#"request_total{direction="outbound",target_port="8080",authority="api.test",namespace="shop",pod="cart-2"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tcp_read_bytes_total{direction="outbound",target_port="8080",namespace="",pod=""} 10"#),
            "{text}"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("binding the admin server")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_chain_reads_like_anyhows_alternate_form() {
        let inner = std::io::Error::other("address in use");
        assert_eq!(
            ErrorChain(&Outer(inner)).to_string(),
            "binding the admin server: address in use"
        );
    }
}
