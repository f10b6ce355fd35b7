//! Response observation: every request is counted as it comes, and every response is recorded
//! once, when its stream ends or is abandoned, with its status, its gRPC status (trailers, or
//! headers of a trailers-only response) and its classification. Latency is time to response
//! headers.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{Response, StatusCode};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use super::{ConnInfo, HttpProxy};
use crate::{
    metrics::{
        Metrics,
        http::{LatencyLabels, RequestLabels, ResponseLabels},
    },
    tap::{Tap, TapEvent, now_ms},
};

pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// One client connection's request recording: what every record of it shares, and the series
/// its requests last counted in. A connection's requests nearly always carry the same labels
/// (one authority, status 200), so the agent-wide families (a lock shared by the proxy
/// threads, a hash of every label, a copy of each) are consulted only when a label changes,
/// and a record costs one reference count on this connection's recorder instead of several on
/// agent-wide ones. Made at the connection's first request; per connection, so its lock is
/// never contended.
pub struct ConnRecorder {
    metrics: Arc<Metrics>,
    tap: Arc<Tap>,
    pub conn: ConnInfo,
    last: parking_lot::Mutex<LastSeries>,
}

/// The series last used, each with the labels that vary between a connection's requests.
#[derive(Default)]
struct LastSeries {
    /// The raw authority and its bounded label.
    authority: Option<(String, Arc<str>)>,
    request: Option<(Arc<str>, Counter)>,
    latency: Option<((Arc<str>, u16), Histogram)>,
    response: Option<(ResponseKey, Counter)>,
}

#[derive(PartialEq)]
struct ResponseKey {
    authority: Arc<str>,
    status: u16,
    classification: &'static str,
    grpc_status: String,
}

impl ConnRecorder {
    pub fn new(proxy: &HttpProxy, conn: ConnInfo) -> Arc<Self> {
        Arc::new(Self {
            metrics: Arc::clone(&proxy.metrics),
            tap: Arc::clone(&proxy.tap),
            conn,
            last: parking_lot::Mutex::default(),
        })
    }

    /// Counts a request for `raw_authority` and starts its response record; the tap summary
    /// is built only while somebody watches.
    pub fn begin(
        self: &Arc<Self>,
        raw_authority: &str,
        grpc: bool,
        summary: impl FnOnce() -> RequestSummary,
    ) -> ResponseRecord {
        let started = Instant::now();
        let authority = {
            let mut last = self.last.lock();
            let authority = self.authority_label(&mut last, raw_authority);
            self.count_request(&mut last, &authority);
            authority
        };
        ResponseRecord {
            recorder: Arc::clone(self),
            authority,
            request: self.tap.is_watched().then(summary),
            grpc,
            started,
            status: 0,
            latency_ms: 0.0,
        }
    }

    fn authority_label(&self, last: &mut LastSeries, raw: &str) -> Arc<str> {
        match &last.authority {
            Some((seen, label)) if seen == raw => Arc::clone(label),
            _ => {
                // A request without one (HTTP/1.0 without Host) is labelled with the address
                // it was sent to, as Linkerd labels it, rather than as an invalid authority.
                let label: Arc<str> = if raw.trim().is_empty() {
                    let address = self.conn.dst.to_string();
                    self.metrics.http.authority_label(&address).into()
                } else {
                    self.metrics.http.authority_label(raw).into()
                };
                last.authority = Some((raw.to_string(), Arc::clone(&label)));
                label
            }
        }
    }

    fn count_request(&self, last: &mut LastSeries, authority: &Arc<str>) {
        let counter = series(&mut last.request, Arc::clone(authority), |authority| {
            let labels = RequestLabels {
                direction: self.conn.direction,
                target_port: self.conn.dst.port(),
                workload: self.conn.workload.clone(),
                authority: authority.to_string(),
            };
            self.metrics
                .http
                .request_total
                .get_or_create(&labels)
                .clone()
        });
        counter.inc();
    }

    fn observe_latency(&self, authority: &Arc<str>, status: u16, millis: f64) {
        let mut last = self.last.lock();
        let key = (Arc::clone(authority), status);
        let histogram = series(&mut last.latency, key, |(authority, status)| {
            let labels = LatencyLabels {
                direction: self.conn.direction,
                target_port: self.conn.dst.port(),
                workload: self.conn.workload.clone(),
                authority: authority.to_string(),
                status_code: *status,
            };
            let latency = &self.metrics.http.response_latency_ms;
            latency.get_or_create(&labels).clone()
        });
        histogram.observe(millis);
    }

    fn count_response(&self, key: ResponseKey) {
        let mut last = self.last.lock();
        let counter = series(&mut last.response, key, |key| {
            let labels = ResponseLabels {
                direction: self.conn.direction,
                target_port: self.conn.dst.port(),
                workload: self.conn.workload.clone(),
                authority: key.authority.to_string(),
                status_code: key.status,
                classification: key.classification,
                grpc_status: key.grpc_status.clone(),
            };
            self.metrics
                .http
                .response_total
                .get_or_create(&labels)
                .clone()
        });
        counter.inc();
    }
}

/// The series kept in `slot` if it was made for `key`; else the one `find` looks up in the
/// agent-wide family, kept in `slot` for the next request.
fn series<K: PartialEq, S>(slot: &mut Option<(K, S)>, key: K, find: impl FnOnce(&K) -> S) -> &S {
    let kept = match slot.take() {
        Some((seen, series)) if seen == key => (seen, series),
        _ => {
            let series = find(&key);
            (key, series)
        }
    };
    &slot.insert(kept).1
}

/// What a response is recorded with, once its end (or its abandonment) is known.
pub struct ResponseRecord {
    recorder: Arc<ConnRecorder>,
    /// The bounded label value.
    authority: Arc<str>,
    /// None when nobody watched the tap as the request came in.
    request: Option<RequestSummary>,
    grpc: bool,
    started: Instant,
    /// The response's status, once its head is known.
    pub status: u16,
    /// Time to response headers, once known.
    latency_ms: f64,
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
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        self.latency_ms = millis;
        self.recorder
            .observe_latency(&self.authority, status, millis);
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
        let recorder = &self.recorder;
        recorder.count_response(ResponseKey {
            authority: Arc::clone(&self.authority),
            status: outcome.status,
            classification: outcome.classification(self.grpc),
            grpc_status: if self.grpc {
                outcome.grpc_status.clone().unwrap_or_default()
            } else {
                String::new()
            },
        });
        let Some(request) = &self.request else {
            return;
        };
        let conn = &recorder.conn;
        recorder.tap.publish(|| TapEvent::Http {
            ts_ms: now_ms(),
            id: conn.id,
            direction: conn.direction,
            workload: conn.workload.clone(),
            dst: conn.dst,
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
