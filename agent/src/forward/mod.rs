//! Forwarding: moving bytes between the client and its original destination. `http` proxies
//! requests (HTTP/1 forwarded as bytes, h2c frames passed through unchanged). Opaque connections have one entry
//! point, `OpaqueForwarding::forward`, which owns their path: `opaque` splices raw TCP through
//! `pipe`'s pooled pipes, and a connection that turns out chatty is handed to `kernel`
//! (sockmap) while few connections are busy (`busy`), or else copied (`copy`, through a
//! buffer each proxy thread lends) to the end.

pub mod busy;
pub mod copy;
pub mod http;
pub mod io;
pub mod kernel;
pub mod opaque;
pub mod pipe;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use tokio::net::TcpStream;

use self::{
    busy::Activity,
    kernel::{Handoff, KernelForwarder},
    opaque::{ChattyGate, Outcome, Spliced},
    pipe::PipePool,
};
use crate::{
    accel::AccelLink,
    config::CopyMode,
    metrics::{Metrics, TcpLabels},
};

/// Idle pipes each proxy thread keeps for reuse; more are created on demand and closed when
/// returned.
const MAX_IDLE_PIPES: usize = 256;
/// Connections the kernel may forward at once, busy or idle, per `--sockmap-connections`: the
/// hand-off counts busy connections only, so idle ones could gather in the kernel without
/// bound and, turning busy together, cost what the rule avoids (a kworker wake-up per message
/// each).
const IN_KERNEL_PER_BUSY: usize = 4;

/// How opaque connections move their bytes (`--copy-mode`), and what that takes.
pub struct OpaqueForwarding {
    copy_mode: CopyMode,
    /// In-kernel forwarding (`--copy-mode sockmap`, when this kernel can do it).
    kernel: Option<Arc<KernelForwarder>>,
    /// Opaque connections open now (in `forward`, with a kernel), busy or idle.
    activity: Activity,
    /// In-kernel forwarding is chosen only while at most this many are busy
    /// (`--sockmap-connections`).
    kernel_while_busy: usize,
    pipes: PipePool,
}

impl OpaqueForwarding {
    pub fn new(
        copy_mode: CopyMode,
        kernel: Option<Arc<KernelForwarder>>,
        kernel_while_busy: usize,
        busy_gauge: Gauge,
    ) -> Self {
        Self {
            copy_mode,
            kernel,
            activity: Activity::new(busy_gauge),
            kernel_while_busy,
            pipes: PipePool::new(MAX_IDLE_PIPES),
        }
    }

    /// Whether chatty connections may go to the kernel, so that their activity is worth
    /// sweeping.
    pub fn hands_off_to_the_kernel(&self) -> bool {
        // There is a kernel forwarder only with `--copy-mode sockmap`.
        self.kernel.is_some()
    }

    /// Brings the busy count (and its gauge) up to date: called every `busy::SWEEP_EVERY`.
    pub fn sweep_activity(&self) {
        if let Some(kernel) = &self.kernel {
            // The agent sees no bytes of the connections the kernel forwards; TCP_INFO does.
            kernel.sync_counters();
        }
        self.activity.sweep();
    }

    /// Moves an opaque connection's bytes both ways, from the first, until both directions
    /// end or one fails. With `--copy-mode sockmap` it starts spliced and, once it turns out
    /// chatty, is handed to the kernel if at most `--sockmap-connections` opaque connections
    /// are busy (and the kernel takes it), or else copied in user space: small messages cost
    /// less copied than spliced, and with many busy connections at once user space, whose
    /// wake-ups serve several of them, costs less than kernel redirects, which wake a kworker
    /// each. Bulk streams and short connections stay spliced. `count_mode` hears how the
    /// bytes moved (sockmap, splice or userspace), once.
    pub async fn forward(
        &self,
        client: TcpStream,
        server: TcpStream,
        counters: &ByteCounters,
        count_mode: impl Fn(&'static str),
    ) -> Outcome {
        if self.copy_mode == CopyMode::Userspace {
            count_mode("userspace");
            return user_space_copy(client, server, counters).await;
        }
        let Some(kernel) = &self.kernel else {
            count_mode("splice");
            return opaque::splice_to_end(client, server, &self.pipes, counters).await;
        };
        let _watching = self.activity.watch(Arc::clone(&counters.connection));
        let gate = ChattyGate::new();
        let spliced =
            opaque::splice_bidirectional(client, server, &self.pipes, counters, Some(&gate)).await;
        let (client, server) = match spliced {
            Spliced::Done(outcome) => {
                count_mode("splice");
                return outcome;
            }
            Spliced::Chatty(client, server) => (client, server),
        };
        // No pipe holds bytes and every byte read so far is written: copying can go on from
        // here as well as the kernel can.
        if !self.kernel_may_take(kernel) {
            count_mode("userspace");
            return user_space_copy(client, server, counters).await;
        }
        // Boxed like the copy: only connections that turned out chatty get this far.
        match Box::pin(kernel.forward(client, server, counters, || count_mode("sockmap"))).await {
            Handoff::Forwarded(outcome) => outcome,
            Handoff::Declined(client, server) => {
                count_mode("userspace");
                user_space_copy(client, server, counters).await
            }
        }
    }

    /// Whether a connection that turned chatty goes to the kernel: only while few connections
    /// are busy (this one included), and while the kernel forwards fewer than
    /// `IN_KERNEL_PER_BUSY` times as many, busy or idle.
    fn kernel_may_take(&self, kernel: &KernelForwarder) -> bool {
        self.activity.busy() <= self.kernel_while_busy
            && kernel.forwarding() < self.kernel_while_busy.saturating_mul(IN_KERNEL_PER_BUSY)
    }
}

/// The user-space copy, boxed: inline, its state (both directions' reads and writes) would
/// size every opaque connection's task, though most are spliced or forwarded by the kernel.
fn user_space_copy<'a>(
    client: TcpStream,
    server: TcpStream,
    counters: &'a ByteCounters,
) -> Pin<Box<impl Future<Output = Outcome> + 'a>> {
    Box::pin(copy::copy_bidirectional(client, server, counters))
}

impl OpaqueForwarding {
    /// An opaque connection paired with the application's socket (`--accelerate local`):
    /// copied in user space to the end. Its client socket must be read with recv (splice does
    /// not see redirected bytes) and never handed to the kernel forwarder (a stream verdict on
    /// it would change how it receives).
    pub async fn forward_accelerated(
        &self,
        client: TcpStream,
        server: TcpStream,
        counters: &ByteCounters,
        link: &AccelLink,
    ) -> Outcome {
        copy::copy_accelerated(client, server, counters, link).await
    }
}

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
