//! The upstream side of an HTTP client connection: one connection to the original destination,
//! opened at accept and re-opened when the server closes it (an HTTP/1 server ending a
//! keep-alive connection, an HTTP/2 GOAWAY), so a long-lived client connection keeps working.

use std::{io, net::SocketAddr};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1 as client_h1, http2 as client_h2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex};

use super::Version;
use crate::{
    connect::Dialer,
    forward::{ByteCounters, io::Counted},
};

enum Sender {
    Http1(client_h1::SendRequest<Incoming>),
    Http2(client_h2::SendRequest<Incoming>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Self::Http1(sender) => sender.is_closed(),
            Self::Http2(sender) => sender.is_closed(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Connect(#[from] io::Error),
    #[error("upstream request failed: {0}")]
    Http(#[from] hyper::Error),
}

pub struct Upstream {
    dst: SocketAddr,
    version: Version,
    dialer: Dialer,
    counters: ByteCounters,
    /// The live sender; HTTP/1 requests hold the lock while they wait for their response, which
    /// keeps one client connection's requests in order on one upstream connection.
    sender: Mutex<Option<Sender>>,
}

impl Upstream {
    pub fn new(dst: SocketAddr, version: Version, dialer: Dialer, counters: ByteCounters) -> Self {
        Self {
            dst,
            version,
            dialer,
            counters,
            sender: Mutex::new(None),
        }
    }

    /// Starts with the connection opened at accept.
    pub async fn with_connection(self, server: TcpStream) -> Result<Self, hyper::Error> {
        let sender = handshake(server, self.version, &self.counters).await?;
        *self.sender.lock().await = Some(sender);
        Ok(self)
    }

    pub fn is_http1(&self) -> bool {
        self.version == Version::Http1
    }

    pub async fn send(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut slot = self.sender.lock().await;
        if slot.as_ref().is_none_or(Sender::is_closed) {
            let server = self.dialer.connect(self.dst).await?;
            *slot = Some(handshake(server, self.version, &self.counters).await?);
        }
        match slot.as_mut() {
            Some(Sender::Http1(sender)) => {
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
            Some(Sender::Http2(sender)) => {
                // HTTP/2 multiplexes: release the lock before waiting for the response.
                let mut sender = sender.clone();
                drop(slot);
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
            None => Err(UpstreamError::Connect(io::Error::other(
                "no upstream connection",
            ))),
        }
    }
}

async fn handshake(
    server: TcpStream,
    version: Version,
    counters: &ByteCounters,
) -> Result<Sender, hyper::Error> {
    let io = TokioIo::new(Counted::new(server, counters.clone()));
    Ok(match version {
        Version::Http1 => {
            let (sender, connection) = client_h1::handshake(io).await?;
            tokio::spawn(connection.with_upgrades());
            Sender::Http1(sender)
        }
        Version::Http2 => {
            let (sender, connection) = client_h2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Sender::Http2(sender)
        }
    })
}
