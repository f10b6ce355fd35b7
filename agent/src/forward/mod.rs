//! Forwarding: moving bytes between the client and its original destination.
//! `kernel` hands opaque connections to the kernel (sockmap); `opaque` splices raw TCP through
//! pooled pipes (and copies, for comparison); `http` proxies requests with hyper.

pub mod http;
pub mod io;
pub mod kernel;
pub mod opaque;
pub mod pipe;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{Metrics, TcpLabels};

/// One connection's byte counting: the shared per-destination counters (/metrics) and the
/// connection's own totals (its tap close event). Each chunk costs two relaxed atomic adds.
#[derive(Clone)]
pub struct ByteCounters {
    to_server: Counter,
    from_server: Counter,
    connection: Arc<[AtomicU64; 2]>,
}

impl ByteCounters {
    pub fn new(metrics: &Metrics, labels: &TcpLabels) -> Self {
        Self {
            to_server: metrics.tcp_write_bytes_total.get_or_create(labels).clone(),
            from_server: metrics.tcp_read_bytes_total.get_or_create(labels).clone(),
            connection: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }

    pub fn client_to_server(&self, bytes: u64) {
        self.to_server.inc_by(bytes);
        self.connection[0].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn server_to_client(&self, bytes: u64) {
        self.from_server.inc_by(bytes);
        self.connection[1].fetch_add(bytes, Ordering::Relaxed);
    }

    /// This connection's bytes so far, client to server.
    pub fn total_to_server(&self) -> u64 {
        self.connection[0].load(Ordering::Relaxed)
    }

    /// This connection's bytes so far, server to client.
    pub fn total_from_server(&self) -> u64 {
        self.connection[1].load(Ordering::Relaxed)
    }
}
