//! Classify: decide how to forward a connection, from the first bytes of whichever side speaks
//! first. The client's bytes go to `detect`; if the server speaks before the client has said
//! anything decidable, the protocol is server-first and the connection is opaque at once (no
//! waiting for a detection timeout). Bytes read from the client are kept and replayed.

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::net::TcpStream;

use crate::detect::{self, Detection};

/// Most client bytes read while detecting. Large enough for a whole TLS ClientHello (post-
/// quantum key shares push them past 1 KiB) and any sane HTTP/1 request line.
pub const MAX_DETECT_BYTES: usize = 16 * 1024 + 5;
const INITIAL_BUFFER: usize = 1024;

/// How the connection will be forwarded, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Opaque TLS (not terminated), with the ClientHello's server name when there was one.
    Tls {
        sni: Option<String>,
    },
    Opaque(OpaqueReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpaqueReason {
    /// The destination port is configured opaque: no detection at all.
    OpaquePort,
    /// The client's bytes are not a protocol we proxy at request level.
    Unknown,
    /// The server spoke first.
    ServerFirst,
    /// Nobody spoke within the detection timeout.
    Timeout,
    /// Reading the client failed.
    Error,
}

impl Protocol {
    /// The `result` label of the detection metrics.
    pub fn result_label(&self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Tls { .. } => "tls",
            Self::Opaque(OpaqueReason::OpaquePort) => "opaque_port",
            Self::Opaque(OpaqueReason::Unknown) => "opaque",
            Self::Opaque(OpaqueReason::ServerFirst) => "server_first",
            Self::Opaque(OpaqueReason::Timeout) => "timeout",
            Self::Opaque(OpaqueReason::Error) => "error",
        }
    }
}

/// The decision, plus the client bytes consumed to make it (to be sent on first).
pub struct Classified {
    pub protocol: Protocol,
    pub prefix: BytesMut,
    pub elapsed: Duration,
}

/// Reads the client until its protocol is known, the server speaks, or `timeout` passes.
/// `server` is None when there is no upstream (its connect failed): then only the client counts.
pub async fn classify(
    client: &TcpStream,
    server: Option<&TcpStream>,
    timeout: Duration,
) -> Classified {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    // Allocated on the first read: a silent connection holds no buffer.
    let mut prefix = BytesMut::new();
    let mut watched_server = server;
    let protocol = loop {
        tokio::select! {
            // The server first: once it has spoken, the client's bytes no longer matter...
            biased;
            _ = server_speaks(watched_server) => {
                // ...unless it is an h2c server's SETTINGS, sent without waiting for the client.
                if !sent_http2_preface(watched_server).await {
                    break Protocol::Opaque(OpaqueReason::ServerFirst);
                }
                watched_server = None;
            }
            readable = client.readable() => {
                if readable.is_err() {
                    break Protocol::Opaque(OpaqueReason::Error);
                }
                match read_more(client, &mut prefix) {
                    Ok(ReadOutcome::WouldBlock) => continue,
                    Ok(ReadOutcome::Eof) => break decided(detect::undecided(&prefix)),
                    Err(_) => break Protocol::Opaque(OpaqueReason::Error),
                    Ok(ReadOutcome::Read) => {}
                }
                match detect::detect(&prefix) {
                    Detection::NeedMore if prefix.len() < MAX_DETECT_BYTES => continue,
                    Detection::NeedMore => break decided(detect::undecided(&prefix)),
                    decision => break decided(decision),
                }
            }
            _ = tokio::time::sleep_until(deadline) => break match detect::undecided(&prefix) {
                Detection::Tls { sni } => Protocol::Tls { sni },
                _ => Protocol::Opaque(OpaqueReason::Timeout),
            },
        }
    };
    Classified {
        protocol,
        prefix,
        elapsed: started.elapsed(),
    }
}

fn decided(detection: Detection) -> Protocol {
    match detection {
        Detection::Http1 => Protocol::Http1,
        Detection::Http2 => Protocol::Http2,
        Detection::Tls { sni } => Protocol::Tls { sni },
        Detection::Opaque | Detection::NeedMore => Protocol::Opaque(OpaqueReason::Unknown),
    }
}

/// Resolves when the server has bytes (or an EOF or error) for us; never without a server.
async fn server_speaks(server: Option<&TcpStream>) {
    match server {
        Some(server) => {
            let _ = server.readable().await;
        }
        None => std::future::pending().await,
    }
}

/// Peeks (the bytes stay queued for whoever forwards them) at what the server sent.
async fn sent_http2_preface(server: Option<&TcpStream>) -> bool {
    let Some(server) = server else { return false };
    let mut head = [0u8; 9];
    match server.peek(&mut head).await {
        Ok(n) => {
            let preface = detect::is_http2_server_preface(&head[..n]);
            tracing::debug!(peeked = n, preface, first = ?&head[..n], "the server spoke first");
            preface
        }
        Err(_) => false,
    }
}

enum ReadOutcome {
    Read,
    WouldBlock,
    Eof,
}

fn read_more(client: &TcpStream, prefix: &mut BytesMut) -> std::io::Result<ReadOutcome> {
    let room = MAX_DETECT_BYTES - prefix.len();
    prefix.reserve(room.min(INITIAL_BUFFER));
    match client.try_read_buf(&mut prefix.limit(room)) {
        Ok(0) => Ok(ReadOutcome::Eof),
        Ok(_) => Ok(ReadOutcome::Read),
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(ReadOutcome::WouldBlock),
        Err(error) => Err(error),
    }
}
