//! The upstream side of an h2c client connection: one HTTP/2 connection to the original
//! destination, opened at accept and re-opened when the server closes it (GOAWAY), so a
//! long-lived client connection keeps working. A request the origin refused unprocessed (above
//! a GOAWAY's last stream id, REFUSED_STREAM, or never sent because the connection was closing)
//! is sent once more on a new connection, as RFC 9113 section 8.7 allows, when it has no body
//! to replay; the client never sees the origin's connection turnover.

use std::{error::Error as _, io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::{
    Request, Response,
    body::{Body as _, Incoming},
    client::conn::http2 as client_h2,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex};
use tokio_util::task::TaskTracker;

use crate::{
    connect::Dialer,
    forward::{ByteCounters, io::Counted},
    metrics::Direction,
    netns::Origin,
};

/// The client's body, or none for a request sent again.
type UpstreamBody = Either<Incoming, Empty<Bytes>>;
type Sender = client_h2::SendRequest<UpstreamBody>;

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
    /// The live sender and how many connections were opened before it; held only to (re)open
    /// the connection, never across a response.
    sender: Mutex<Option<(u64, Sender)>>,
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
        *self.sender.lock().await = Some((0, sender));
        Ok(self)
    }

    pub async fn send(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let again = request
            .body()
            .is_end_stream()
            .then(|| bodiless_copy(&request));
        let (used, result) = self.send_on_current(request.map(Either::Left), None).await;
        match (result, again) {
            (Err(UpstreamError::Http(error)), Some(again)) if never_processed(&error) => {
                tracing::debug!(%error, "request refused unprocessed; sending it again");
                self.send_on_current(again, used).await.1
            }
            (result, _) => result,
        }
    }

    /// Sends on the live connection, opening one if there is none, it has closed, or it is the
    /// one numbered `stale` (which refused a request). Returns the connection's number.
    async fn send_on_current(
        &self,
        request: Request<UpstreamBody>,
        stale: Option<u64>,
    ) -> (Option<u64>, Result<Response<Incoming>, UpstreamError>) {
        let mut slot = self.sender.lock().await;
        let current = slot.as_ref().map(|(number, _)| *number);
        let unusable = slot
            .as_ref()
            .is_none_or(|(number, sender)| sender.is_closed() || Some(*number) == stale);
        if unusable {
            // Boxed: re-opening is rare, and its state would otherwise be carried (and
            // copied) by every request's future.
            match Box::pin(self.reconnect()).await {
                Ok(sender) => *slot = Some((current.map_or(0, |n| n + 1), sender)),
                Err(error) => return (current, Err(error)),
            }
        }
        // HTTP/2 multiplexes: release the lock before waiting for the response.
        let Some((number, mut sender)) = slot.clone() else {
            return (
                None,
                Err(UpstreamError::Connect(io::Error::other(
                    "no upstream connection",
                ))),
            );
        };
        drop(slot);
        let result = async {
            sender.ready().await?;
            Ok(sender.send_request(request).await?)
        }
        .await;
        (Some(number), result)
    }
}

/// The same request without a body (it had none), to send again.
fn bodiless_copy(request: &Request<Incoming>) -> Request<UpstreamBody> {
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Whether the origin is known not to have processed the request: hyper never sent it (the
/// connection was closing), or the origin's GOAWAY (graceful, NO_ERROR) or REFUSED_STREAM
/// covered its stream.
fn never_processed(error: &hyper::Error) -> bool {
    if error.is_canceled() {
        return true;
    }
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = cause.source();
    }
    false
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
