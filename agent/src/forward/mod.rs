//! Forwarding: moving bytes between the client and its original destination.
//! `opaque` splices raw TCP through pooled pipes; `http` proxies requests with hyper.

pub mod http;
pub mod io;
pub mod opaque;
pub mod pipe;

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{Metrics, TcpLabels};

/// Per-connection handles on the byte counters, so each chunk costs one atomic add.
#[derive(Clone)]
pub struct ByteCounters {
    to_server: Counter,
    from_server: Counter,
}

impl ByteCounters {
    pub fn new(metrics: &Metrics, labels: &TcpLabels) -> Self {
        Self {
            to_server: metrics.tcp_write_bytes_total.get_or_create(labels).clone(),
            from_server: metrics.tcp_read_bytes_total.get_or_create(labels).clone(),
        }
    }

    pub fn client_to_server(&self, bytes: u64) {
        self.to_server.inc_by(bytes);
    }

    pub fn server_to_client(&self, bytes: u64) {
        self.from_server.inc_by(bytes);
    }
}
