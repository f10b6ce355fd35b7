//! The upstream side of an h2c client connection: one HTTP/2 connection to the original
//! destination, opened at accept and re-opened when the server closes it (GOAWAY), so a
//! long-lived client connection keeps working.

use std::{io, net::SocketAddr, sync::Arc};

use hyper::{Request, Response, body::Incoming, client::conn::http2 as client_h2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex};
use tokio_util::task::TaskTracker;

use crate::{
    connect::Dialer,
    forward::{ByteCounters, io::Counted},
    metrics::Direction,
    netns::Origin,
};

type Sender = client_h2::SendRequest<Incoming>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Connect(#[from] io::Error),
    #[error("upstream request failed: {0}")]
    Http(#[from] hyper::Error),
}

pub struct Upstream {
    dst: SocketAddr,
    dialer: Dialer,
    origin: Arc<Origin>,
    direction: Direction,
    counters: ByteCounters,
    /// Where each connection's task runs: the agent's drain.
    tasks: TaskTracker,
    /// The live sender; held only to (re)open the connection, never across a response.
    sender: Mutex<Option<Sender>>,
}

impl Upstream {
    pub fn new(
        dst: SocketAddr,
        dialer: Dialer,
        origin: Arc<Origin>,
        direction: Direction,
        counters: ByteCounters,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            dst,
            dialer,
            origin,
            direction,
            counters,
            tasks,
            sender: Mutex::new(None),
        }
    }

    /// Starts with the connection opened at accept.
    pub async fn with_connection(self, server: TcpStream) -> Result<Self, hyper::Error> {
        let sender = handshake(server, &self.counters, &self.tasks).await?;
        *self.sender.lock().await = Some(sender);
        Ok(self)
    }

    pub async fn send(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut slot = self.sender.lock().await;
        if slot.as_ref().is_none_or(Sender::is_closed) {
            // Boxed: re-opening is rare, and its state would otherwise be carried (and
            // copied) by every request's future.
            *slot = Some(Box::pin(self.reconnect()).await?);
        }
        // HTTP/2 multiplexes: release the lock before waiting for the response.
        let Some(mut sender) = slot.clone() else {
            return Err(UpstreamError::Connect(io::Error::other(
                "no upstream connection",
            )));
        };
        drop(slot);
        sender.ready().await?;
        Ok(sender.send_request(request).await?)
    }
}

impl Upstream {
    async fn reconnect(&self) -> Result<Sender, UpstreamError> {
        let server = self
            .dialer
            .connect(self.dst, &self.origin, self.direction)
            .await?;
        Ok(handshake(server, &self.counters, &self.tasks).await?)
    }
}

/// Opens an HTTP/2 connection over `server`. Its task (on the drain's tracker) ends when the
/// server closes the connection or when the last clone of the returned sender is dropped,
/// that is once the client connection that owns this `Upstream` has ended.
async fn handshake(
    server: TcpStream,
    counters: &ByteCounters,
    tasks: &TaskTracker,
) -> Result<Sender, hyper::Error> {
    let io = TokioIo::new(Counted::new(server, counters.clone()));
    let (sender, connection) = client_h2::handshake(TokioExecutor::new(), io).await?;
    tasks.spawn(connection);
    Ok(sender)
}
