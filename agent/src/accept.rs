//! Accept: the outbound listeners on 127.0.0.1 and ::1 where the kernel sends redirected
//! connects, and the accept loop that hands each connection to its own task.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::connection::{self, Proxy};

/// Listen backlog: the kernel caps it at net.core.somaxconn (4096 here).
const LISTEN_BACKLOG: u32 = 4096;
/// Pause after an accept error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds the outbound listeners (IPv4 and IPv6 loopback) on `port`, not yet registered with a
/// runtime. With SO_REUSEPORT each proxy thread binds its own pair and the kernel spreads
/// connections over them.
pub fn bind_listeners(port: u16) -> Result<Vec<std::net::TcpListener>> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    Ok(vec![bind(v4)?, bind(v6)?])
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding the proxy listener {addr}"))?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    Ok(socket.into())
}

/// Accepts until `shutdown` fires; every connection runs as a task on `tracker`.
pub async fn serve(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "registering the proxy listener failed");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                tracker.spawn(connection::handle(client, peer, Arc::clone(&proxy)));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}
