//! Accept: the listeners on 127.0.0.1 and ::1 where the kernel sends connections (outbound:
//! redirected connects; inbound: connections sk_lookup steers to a meshed server), in the
//! agent's own network namespace and in each served pod's, and the accept loop that hands
//! each connection to its own task.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    connection::{self, Proxy},
    liveness::Heartbeats,
    metrics::{AcceptErrorLabels, Direction, errno_name},
    netns::Origin,
};

/// Listen backlog: the kernel caps it at net.core.somaxconn (4096 here).
const LISTEN_BACKLOG: u32 = 4096;
/// Pauses after failed accepts (EMFILE, ENFILE, ENOBUFS, ENOMEM: the agent is out of something
/// and retrying at once would spin a core): from the first, doubling up to the last, back to
/// the first after an accept succeeds. The kernel's budget (`liveness`) keeps most connects
/// away from a full agent; this is what is left for the ones already queued.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("creating a listener socket")]
    Socket(#[source] std::io::Error),
    #[error(
        "port {} is already in use on {} (another sockmesh agent, or a server: give this \
         agent other ports)",
        .addr.port(),
        .addr.ip()
    )]
    InUse { addr: SocketAddr },
    #[error("binding the proxy listener {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Setting up a listener socket (options, listen).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = AcceptError> = std::result::Result<T, E>;

/// Binds the outbound listeners (IPv4 and IPv6 loopback) on `port` in `origin`'s network
/// namespace, not yet registered with a runtime. With SO_REUSEPORT each proxy thread binds its
/// own pair and the kernel spreads connections over them.
pub fn bind_listeners(
    origin: &Origin,
    port: u16,
    keepalive: Option<Duration>,
) -> Result<Vec<std::net::TcpListener>> {
    let [v4, v6] = loopback(port);
    Ok(vec![
        bind(origin, v4, keepalive)?,
        bind(origin, v6, keepalive)?,
    ])
}

fn loopback(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
}

/// Fails when something already listens on `port` on loopback in `origin`'s namespace. The
/// listeners join any SO_REUSEPORT group of the same user, so without this a second agent
/// given the same port would start and silently take a share of the first one's connections.
/// The probe binds without SO_REUSEPORT, which only a listener refuses (a previous agent's
/// connections in TIME_WAIT do not).
fn ensure_port_free(origin: &Origin, port: u16) -> Result<()> {
    for addr in loopback(port) {
        let probe = socket(origin, addr)?;
        if let Err(source) = probe.bind(&addr.into()) {
            return Err(if source.kind() == std::io::ErrorKind::AddrInUse {
                AcceptError::InUse { addr }
            } else {
                AcceptError::Bind { addr, source }
            });
        }
    }
    Ok(())
}

/// A TCP socket for `addr` in `origin`'s namespace, with the options every listener has.
fn socket(origin: &Origin, addr: SocketAddr) -> Result<Socket> {
    let socket = origin
        .within(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))
        .map_err(AcceptError::Socket)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

fn bind(
    origin: &Origin,
    addr: SocketAddr,
    keepalive: Option<Duration>,
) -> Result<std::net::TcpListener> {
    let socket = socket(origin, addr)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit both: the agent's writes to its clients are never held back by
    // Nagle, a client that vanished is found by keepalive, and no connection pays a
    // setsockopt of its own for either.
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = keepalive {
        socket.set_tcp_keepalive(&crate::connect::keepalive(idle))?;
    }
    socket
        .bind(&addr.into())
        .map_err(|source| AcceptError::Bind { addr, source })?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    Ok(socket.into())
}

/// What a listener's connections share: where they come from, the proxy, and the signals that
/// end them. The host's listeners and each pod's have their own.
#[derive(Clone)]
pub struct Scope {
    pub origin: Arc<Origin>,
    pub proxy: Arc<Proxy>,
    /// Whether this scope's listeners take outbound or inbound connections.
    pub direction: Direction,
    /// Every connection of the agent runs on this tracker (the shutdown drain waits for it).
    pub connections: TaskTracker,
    /// Cancelled to stop accepting (shutdown, or the pod's removal).
    pub stop_accepting: CancellationToken,
    /// A pod's own drain; None for the host's listeners, whose connections end with the
    /// proxy threads' runtimes.
    pub pod_drain: Option<PodDrain>,
}

/// How a removed pod's connections end: its removal waits for the ones on `connections`,
/// then cancels `abort` to close those still open.
#[derive(Clone)]
pub struct PodDrain {
    pub connections: TaskTracker,
    pub abort: CancellationToken,
}

/// The proxy threads' runtimes: each listener pair is served by one of them.
#[derive(Clone)]
pub struct ProxyThreads {
    pub handles: Vec<tokio::runtime::Handle>,
    /// Each thread's heartbeat, ticked by its own runtime.
    pub heartbeats: Heartbeats,
}

impl ProxyThreads {
    /// Opens a listener pair on `port` in the scope's namespace for every proxy thread and
    /// starts accepting on them. When this returns, connects to the port are accepted.
    /// Returns a handle on one pair (IPv4, IPv6): each stands for its SO_REUSEPORT group,
    /// which is what sk_lookup assigns connections to.
    pub fn listen(&self, scope: &Scope, port: u16) -> Result<Vec<std::net::TcpListener>> {
        ensure_port_free(&scope.origin, port)?;
        let mut pairs = Vec::with_capacity(self.handles.len());
        for _ in &self.handles {
            pairs.push(bind_listeners(
                &scope.origin,
                port,
                scope.proxy.keepalive(),
            )?);
        }
        let first = pairs[0]
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        for (handle, listeners) in self.handles.iter().zip(pairs) {
            for listener in listeners {
                handle.spawn(serve(listener, scope.clone()));
            }
        }
        Ok(first)
    }
}

/// Accepts until the scope stops accepting; every connection runs as a task.
pub async fn serve(listener: std::net::TcpListener, scope: Scope) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "registering the proxy listener failed");
            return;
        }
    };
    let Ok(listener_addr) = listener.local_addr() else {
        tracing::error!("the proxy listener has no address");
        return;
    };
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let accepted = tokio::select! {
            () = scope.stop_accepting.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                spawn_connection(&scope, client, accepted_from(&scope, peer, listener_addr));
            }
            Err(error) => {
                let errno = errno_name(&error);
                let labels = AcceptErrorLabels { errno };
                scope
                    .proxy
                    .metrics
                    .accept_errors_total
                    .get_or_create(&labels)
                    .inc();
                // Logged once per backoff step, not once per failed accept.
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    () = scope.stop_accepting.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    drain_backlog(&listener, listener_addr, &scope);
}

fn accepted_from(scope: &Scope, peer: SocketAddr, listener: SocketAddr) -> connection::Accepted {
    connection::Accepted {
        peer,
        listener,
        direction: scope.direction,
    }
}

/// Accepts what is already queued before the listener closes: closing a listener resets the
/// connections in its accept queue, and those clients saw their connect succeed. The kernel
/// stopped redirecting before `stop_accepting` fired, so nothing new arrives.
fn drain_backlog(listener: &TcpListener, listener_addr: SocketAddr, scope: &Scope) {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    let mut drained = 0usize;
    while let std::task::Poll::Ready(Ok((client, peer))) = listener.poll_accept(&mut context) {
        spawn_connection(scope, client, accepted_from(scope, peer, listener_addr));
        drained += 1;
    }
    if drained > 0 {
        tracing::debug!(drained, "accepted the backlog before closing");
    }
}

fn spawn_connection(scope: &Scope, client: tokio::net::TcpStream, accepted: connection::Accepted) {
    let (origin, proxy) = (Arc::clone(&scope.origin), Arc::clone(&scope.proxy));
    match &scope.pod_drain {
        // A pod's connection: its pod's removal waits for it, then cuts it short.
        Some(drain) => {
            let (held, abort) = (drain.connections.token(), drain.abort.clone());
            scope.connections.spawn(connection_task(
                client, accepted, origin, proxy, held, abort,
            ));
        }
        // The host's: they end with the agent (its runtimes drop them after the drain), so
        // their tasks carry nothing more than the connection itself.
        None => {
            scope
                .connections
                .spawn(connection::handle(client, accepted, origin, proxy));
        }
    }
}

/// A pod connection's whole task: its life (`connection::handle`), cut short if the pod's
/// drain ends first.
/// The connection's future is made inside this one, not moved into it: a future moved into an
/// async block is stored twice (the captured value and the moved-to slot), and every open
/// connection's task would pay for it.
async fn connection_task(
    client: tokio::net::TcpStream,
    accepted: connection::Accepted,
    origin: Arc<Origin>,
    proxy: Arc<Proxy>,
    held: tokio_util::task::task_tracker::TaskTrackerToken,
    abort: CancellationToken,
) {
    let _held = held;
    tokio::select! {
        () = connection::handle(client, accepted, origin, proxy) => {}
        () = abort.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, G, F>(_: impl Fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The connections a listener accepts have TCP_NODELAY and the keepalive settings from it
    /// (Linux copies the listener's socket and TCP options into the socket it accepts, and
    /// starts its keepalive timer): no connection needs a setsockopt.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_listener() {
        let idle = Duration::from_secs(7);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let listener = bind(&Origin::host(0), addr, Some(idle)).unwrap();
        listener.set_nonblocking(false).unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "the accepted socket has Nagle on"
        );
        let options = socket2::SockRef::from(&accepted);
        assert!(options.keepalive().unwrap(), "no keepalive");
        assert_eq!(options.tcp_keepalive_time().unwrap(), idle);
        assert_eq!(options.tcp_keepalive_interval().unwrap(), idle);
        let off = bind(&Origin::host(0), addr, None).unwrap();
        assert!(!socket2::SockRef::from(&off).keepalive().unwrap());
        assert_eq!(
            accepted.local_addr().unwrap(),
            listener.local_addr().unwrap(),
            "an accepted connection's local address is its listener's"
        );
        drop(client);
    }

    /// Every open connection's task is this future: it may add little to the connection's
    /// own (bounded in connection.rs).
    #[test]
    fn a_connection_task_adds_little_to_its_connection() {
        let size = future_size(connection_task);
        assert!(size <= 2048 + 256, "a connection's task is {size} bytes");
    }
}
