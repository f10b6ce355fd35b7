//! Request-level metrics, named like Linkerd's proxy (request_total, response_total,
//! response_latency_ms) so existing dashboards work.
//!
//! Cardinality is bounded: `authority` takes at most MAX_AUTHORITIES distinct values per agent
//! (later ones are reported as "other"), status codes are at most 1000 values, grpc_status at most
//! 17 plus empty, classification two.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};

use super::{BoundedLabel, Direction, WorkloadLabels, family::Family};

/// Distinct authority label values before new ones become "other".
pub const MAX_AUTHORITIES: usize = 100;

/// Linkerd's response_latency_ms buckets.
const LATENCY_BUCKETS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub target_port: u16,
    pub authority: String,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: Direction,
    pub target_port: u16,
    pub authority: String,
    pub status_code: u16,
    pub classification: &'static str,
    /// Empty for plain HTTP; the numeric gRPC status for gRPC.
    pub grpc_status: String,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub target_port: u16,
    pub authority: String,
    pub status_code: u16,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpErrorLabels {
    pub direction: Direction,
    /// bad_request, upstream_unavailable, upstream_timeout
    pub reason: &'static str,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

/// An HTTP/2 connection whose frames stopped being followed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnobservedLabels {
    pub direction: Direction,
    /// header_block_too_large, malformed_frame, hpack, too_many_streams
    pub reason: &'static str,
    /// Last: a flattened label set must be encoded last.
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

pub struct HttpMetrics {
    pub request_total: Family<RequestLabels, Counter>,
    pub response_total: Family<ResponseLabels, Counter>,
    pub response_latency_ms: Family<LatencyLabels, Histogram>,
    pub errors_total: Family<HttpErrorLabels, Counter>,
    pub http2_unobserved_total: Family<UnobservedLabels, Counter>,
    authorities: BoundedLabel,
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            request_total: Family::default(),
            response_total: Family::default(),
            response_latency_ms: Family::new_with_constructor(|| {
                Histogram::new(LATENCY_BUCKETS_MS)
            }),
            errors_total: Family::default(),
            http2_unobserved_total: Family::default(),
            authorities: BoundedLabel::new(MAX_AUTHORITIES),
        };
        registry.register(
            "request",
            "HTTP requests proxied",
            metrics.request_total.clone(),
        );
        registry.register(
            "response",
            "HTTP responses, classified at the end of the stream (gRPC by grpc-status)",
            metrics.response_total.clone(),
        );
        registry.register(
            "response_latency_ms",
            "Time from request to response headers, in milliseconds",
            metrics.response_latency_ms.clone(),
        );
        registry.register(
            "sockmesh_http_errors",
            "HTTP requests the proxy answered itself: 400, 502, 504",
            metrics.errors_total.clone(),
        );
        registry.register(
            "sockmesh_http2_unobserved",
            "HTTP/2 connections whose frames the proxy stopped following (forwarded unchanged, \
             their requests no longer counted)",
            metrics.http2_unobserved_total.clone(),
        );
        metrics
    }

    /// Removes every series of `workload`; returns how many went.
    pub fn forget_workload(&self, workload: &WorkloadLabels) -> usize {
        let other = |labels: &WorkloadLabels| labels != workload;
        self.request_total.retain(|l| other(&l.workload))
            + self.response_total.retain(|l| other(&l.workload))
            + self.response_latency_ms.retain(|l| other(&l.workload))
            + self.errors_total.retain(|l| other(&l.workload))
            + self.http2_unobserved_total.retain(|l| other(&l.workload))
    }

    /// The authority label for `authority` (bounded, sanitized).
    pub fn authority_label(&self, authority: &str) -> String {
        self.authorities.label(authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_bounded_and_sanitized() {
        let metrics = HttpMetrics::register(&mut Registry::default());
        assert_eq!(
            metrics.authority_label("Example.TEST:8080"),
            "example.test:8080"
        );
        assert_eq!(metrics.authority_label("evil\"}\n"), "invalid");
        for i in 0..MAX_AUTHORITIES * 2 {
            metrics.authority_label(&format!("host{i}"));
        }
        assert_eq!(metrics.authority_label("one-too-many"), "other");
        assert_eq!(
            metrics.authority_label("example.test:8080"),
            "example.test:8080"
        );
    }
}
