//! What the fuzz targets share: hyper as a reference HTTP/1 implementation, driven in memory.
//!
//! hyper is the HTTP/1 library sockmesh's h2c path already uses, and a server the agent may
//! well forward to. The differential checks ask it the questions that matter for request
//! smuggling: does it accept this head, and where does it think the message body ends? Each
//! call runs one hyper connection over an in-memory duplex pipe on a current-thread runtime:
//! the input is written, the writing side closed, and hyper runs until it is done.

use std::{convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Response, body::Body as _, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use parking::Slot;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Room for any fuzz input: the writer never waits for hyper to read.
const PIPE: usize = 1 << 20;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|runtime| runtime.block_on(future))
}

/// How hyper frames a message body, as its body's size hint tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HyperBody {
    /// No body (end of stream at once).
    Empty,
    /// Content-Length.
    Length(u64),
    /// Unknown length: chunked, or (responses only) until the connection closes.
    Unsized,
}

fn body_kind(body: &Incoming) -> HyperBody {
    let hint = body.size_hint();
    match hint.exact() {
        _ if body.is_end_stream() => HyperBody::Empty,
        Some(0) => HyperBody::Empty,
        Some(length) => HyperBody::Length(length),
        None => HyperBody::Unsized,
    }
}

/// What hyper's server made of the first request in a byte stream.
#[derive(Debug, PartialEq, Eq)]
pub struct ServedRequest {
    pub method: String,
    pub body: HyperBody,
    /// How reading the body went, when `read_body` asked for it.
    pub body_read: Option<BodyRead>,
}

/// How hyper's reading of a body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyRead {
    /// To its end.
    Complete,
    /// The stream ended inside it.
    Eof,
    /// A byte that cannot be there (or over one of hyper's limits).
    Malformed,
}

fn body_read(error: &hyper::Error) -> BodyRead {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return if io.kind() == std::io::ErrorKind::UnexpectedEof {
                BodyRead::Eof
            } else {
                BodyRead::Malformed
            };
        }
        source = cause.source();
    }
    if error.is_incomplete_message() {
        BodyRead::Eof
    } else {
        BodyRead::Malformed
    }
}

/// Feeds `bytes` (then end of stream) to a hyper HTTP/1 server. None when hyper rejected the
/// first request head (it answers 400 and never calls the service).
pub fn hyper_server(bytes: &[u8], read_body: bool) -> Option<ServedRequest> {
    let seen: Arc<Slot<ServedRequest>> = Arc::default();
    let service = {
        let seen = Arc::clone(&seen);
        service_fn(move |request: Request<Incoming>| {
            let seen = Arc::clone(&seen);
            async move {
                // Only the first request counts: the rest of the stream is hyper's business.
                let first = seen.set_once(ServedRequest {
                    method: request.method().to_string(),
                    body: body_kind(request.body()),
                    body_read: None,
                });
                if first && read_body {
                    let read = match request.into_body().collect().await {
                        Ok(_) => BodyRead::Complete,
                        Err(error) => body_read(&error),
                    };
                    seen.update(|served| served.body_read = Some(read));
                }
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        })
    };
    block_on(async {
        let (mut client, server) = tokio::io::duplex(PIPE);
        client
            .write_all(bytes)
            .await
            .expect("the pipe holds the input");
        client.shutdown().await.expect("closing the pipe");
        // half_close: the input's end is where the client stopped sending, not a reason to
        // drop the request being served.
        let connection = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(server), service);
        // Errors are answers too (a malformed head, a truncated body): the slot tells.
        let _ = connection.await;
        drop(client);
    });
    seen.take()
}

/// What hyper's client made of a response.
#[derive(Debug, PartialEq, Eq)]
pub struct ReceivedResponse {
    pub status: u16,
    pub body: HyperBody,
    /// The body as hyper decoded it, None if reading it failed.
    pub body_bytes: Option<Vec<u8>>,
}

/// Sends a request (`method`, asking for a WebSocket upgrade if `upgrade`) through a hyper
/// HTTP/1 client to a "server" that answers `response` and closes. None when hyper rejected
/// the response head.
pub fn hyper_client(method: &str, upgrade: bool, response: &[u8]) -> Option<ReceivedResponse> {
    block_on(async {
        let (client, server) = tokio::io::duplex(PIPE);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .ok()?;
        let driver = async move {
            let _ = connection.with_upgrades().await;
        };
        let exchange = async move {
            let target = if method == "CONNECT" {
                "example.test:443"
            } else {
                "/"
            };
            let mut request = Request::builder()
                .method(method)
                .uri(target)
                .header("host", "example.test");
            if upgrade {
                request = request
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket");
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .expect("a valid request");
            let response = sender.send_request(request).await.ok()?;
            let status = response.status().as_u16();
            let body = body_kind(response.body());
            let body_bytes = match response.into_body().collect().await {
                Ok(collected) => Some(collected.to_bytes().to_vec()),
                Err(_) => None,
            };
            Some(ReceivedResponse {
                status,
                body,
                body_bytes,
            })
        };
        let (received, (), ()) = tokio::join!(exchange, driver, answer(server, response));
        received
    })
}

/// The "server": answers `response` once the request head is in (to hyper's client, a
/// response before its request is an unexpected message), then closes.
async fn answer(mut server: DuplexStream, response: &[u8]) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|end| end == b"\r\n\r\n") {
        match server.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let _ = server.write_all(response).await;
    let _ = server.shutdown().await;
}

/// A write-once cell for the service's observation (the service must be `Send + Sync`).
mod parking {
    use std::sync::{Mutex, MutexGuard};

    pub struct Slot<T>(Mutex<Option<T>>);

    impl<T> Default for Slot<T> {
        fn default() -> Self {
            Self(Mutex::new(None))
        }
    }

    impl<T> Slot<T> {
        /// Stores `value` unless a value was stored before; whether it did.
        pub fn set_once(&self, value: T) -> bool {
            let mut slot = self.lock();
            let empty = slot.is_none();
            if empty {
                *slot = Some(value);
            }
            empty
        }

        pub fn update(&self, change: impl FnOnce(&mut T)) {
            if let Some(value) = self.lock().as_mut() {
                change(value);
            }
        }

        pub fn take(&self) -> Option<T> {
            self.lock().take()
        }

        fn lock(&self) -> MutexGuard<'_, Option<T>> {
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }
}

/// Where to cut an input of `len` bytes to check its prefixes: everywhere when short, else
/// about 64 evenly spread places and both sides of each of `special` (a head's end, say), so
/// that a run stays cheap however long the input.
pub fn cuts(len: usize, special: &[usize]) -> Vec<usize> {
    if len <= 128 {
        return (0..len).collect();
    }
    let mut cuts: Vec<usize> = (0..len).step_by(len / 64).collect();
    for &at in special {
        cuts.extend((at.saturating_sub(2)..at + 2).filter(|&cut| cut < len));
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// A budget for checks whose cost grows with the input (every prefix of it, say): keeps each
/// run short, so the fuzzer explores instead of grinding one long input.
pub struct Budget(usize);

impl Budget {
    pub fn new(bytes: usize) -> Self {
        Self(bytes)
    }

    /// Spends `cost`; false once the budget is gone.
    pub fn spend(&mut self, cost: usize) -> bool {
        match self.0.checked_sub(cost) {
            Some(left) => {
                self.0 = left;
                true
            }
            None => false,
        }
    }
}

pub mod chunked;
pub mod http;
pub mod tls;
