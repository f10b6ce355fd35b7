//! Response observation: every response is recorded once, when its stream ends or is abandoned,
//! with its status, its gRPC status (trailers, or headers of a trailers-only response) and its
//! classification. Latency is time to response headers.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{Response, StatusCode};

use super::ConnInfo;
use crate::{
    metrics::{
        Metrics,
        http::{HttpMetrics, LatencyLabels, ResponseLabels},
    },
    tap::{Tap, TapEvent, now_ms},
};

pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What a response is recorded with, once its end (or its abandonment) is known.
pub struct ResponseRecord {
    pub metrics: Arc<Metrics>,
    pub tap: Arc<Tap>,
    pub conn: ConnInfo,
    /// The bounded label value.
    pub authority: String,
    /// None when nobody watched the tap as the request came in.
    pub request: Option<RequestSummary>,
    pub grpc: bool,
    pub started: Instant,
    /// The response's status, once its head is known.
    pub status: u16,
    /// Time to response headers, once known.
    pub latency_ms: f64,
}

/// What the tap shows of a request.
pub struct RequestSummary {
    pub method: String,
    pub authority: String,
    pub path: String,
}

impl ResponseRecord {
    /// A response the proxy makes itself (502/504), as hyper sends it.
    pub fn local_response(self, status: StatusCode) -> Response<ProxyBody> {
        self.answered_locally(status.as_u16());
        let body = Full::new(Bytes::from(format!("{status}\n"))).map_err(|never| match never {});
        let mut response = Response::new(UnsyncBoxBody::new(body));
        *response.status_mut() = status;
        response
    }

    /// Records a response the proxy made itself.
    pub fn answered_locally(mut self, status: u16) {
        self.response_started(status);
        self.finish(status, false);
    }

    /// The response head arrived: its latency is known.
    pub fn response_started(&mut self, status: u16) {
        self.status = status;
        let labels = LatencyLabels {
            direction: self.conn.direction,
            target_port: self.conn.dst.port(),
            workload: self.conn.workload.clone(),
            authority: self.authority.clone(),
            status_code: status,
        };
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        self.latency_ms = millis;
        self.metrics
            .http
            .response_latency_ms
            .get_or_create(&labels)
            .observe(millis);
    }

    /// The response ended (`broken`: midway) without gRPC status.
    pub fn finish(self, status: u16, broken: bool) {
        self.finish_with(status, None, broken);
    }

    /// The response ended (`broken`: midway), with the gRPC status its headers or trailers
    /// carried.
    pub fn finish_with(self, status: u16, grpc_status: Option<String>, broken: bool) {
        self.record(&Outcome {
            status,
            grpc_status,
            broken,
        });
    }

    fn record(&self, outcome: &Outcome) {
        let http: &HttpMetrics = &self.metrics.http;
        let labels = ResponseLabels {
            direction: self.conn.direction,
            target_port: self.conn.dst.port(),
            workload: self.conn.workload.clone(),
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
        let Some(request) = &self.request else {
            return;
        };
        self.tap.publish(|| TapEvent::Http {
            ts_ms: now_ms(),
            id: self.conn.id,
            direction: self.conn.direction,
            workload: self.conn.workload.clone(),
            dst: self.conn.dst,
            method: request.method.clone(),
            authority: request.authority.clone(),
            path: request.path.clone(),
            status: outcome.status,
            latency_ms: self.latency_ms,
            grpc_status: outcome.grpc_status.clone().filter(|_| self.grpc),
        });
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
