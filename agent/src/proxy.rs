//! The outbound proxy: listeners on 127.0.0.1 and ::1, and the life of one redirected
//! connection: accept -> original destination -> connect upstream -> forward (opaque splice)
//! -> metrics.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus_client::metrics::counter::Counter;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    forward::{
        opaque::{self, OnBytes, Outcome},
        pipe::PipePool,
    },
    intercept::OriginalDstMap,
    metrics::{
        ConnectErrorLabels, Direction, LookupLabels, Metrics, TcpCloseLabels, TcpLabels, errno_name,
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
    bypass_mark: u32,
    connect_timeout: Duration,
}

impl Proxy {
    pub fn new(
        metrics: Arc<Metrics>,
        original_dsts: OriginalDstMap,
        bypass_mark: u32,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            metrics,
            original_dsts,
            pipes: PipePool::new(MAX_IDLE_PIPES),
            bypass_mark,
            connect_timeout,
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
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
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

    let errno = match connect_upstream(dst, proxy.bypass_mark, proxy.connect_timeout).await {
        Ok(server) => {
            let _ = client.set_nodelay(true);
            let counters = ByteCounters::new(metrics, &labels);
            match opaque::splice_bidirectional(client, server, &proxy.pipes, &counters).await {
                Outcome::Closed => "",
                Outcome::Reset(failure) => {
                    tracing::debug!(%peer, %dst, step = failure.step, error = %failure.error, "connection reset");
                    errno_name(&failure.error)
                }
            }
        }
        Err(error) => {
            tracing::debug!(%peer, %dst, %error, "upstream connect failed");
            let errno = errno_name(&error);
            metrics
                .tcp_connect_errors_total
                .get_or_create(&ConnectErrorLabels {
                    direction: labels.direction,
                    target_port: labels.target_port,
                    errno,
                })
                .inc();
            opaque::reset(&client);
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

/// Connects to the original destination from a socket carrying the bypass mark, so the
/// kernel programs let it through even when the agent runs inside the meshed cgroup.
async fn connect_upstream(dst: SocketAddr, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    SockRef::from(&socket).set_mark(mark)?;
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
    }
}

/// Per-connection handles on the byte counters, so each chunk costs one atomic add.
struct ByteCounters {
    written: Counter,
    read: Counter,
}

impl ByteCounters {
    fn new(metrics: &Metrics, labels: &TcpLabels) -> Self {
        Self {
            written: metrics.tcp_write_bytes_total.get_or_create(labels).clone(),
            read: metrics.tcp_read_bytes_total.get_or_create(labels).clone(),
        }
    }
}

impl OnBytes for ByteCounters {
    fn client_to_server(&self, bytes: u64) {
        self.written.inc_by(bytes);
    }

    fn server_to_client(&self, bytes: u64) {
        self.read.inc_by(bytes);
    }
}
