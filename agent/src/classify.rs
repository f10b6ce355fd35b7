//! Classify: decide how to forward a connection, from the first bytes of whichever side speaks
//! first. The client's bytes go to `detect`; if the server speaks before the client has said
//! anything decidable, the protocol is server-first and the connection is opaque at once (no
//! waiting for a detection timeout). Bytes read from the client are kept and replayed.

use std::{
    io,
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};

use crate::{
    detect::{self, Detection},
    sys::{self, set_rcvlowat},
};

/// Most client bytes peeked at while detecting. Large enough for a whole TLS ClientHello (post-
/// quantum key shares push them past 1 KiB), also when split across records (5 bytes more
/// each), and any sane HTTP/1 request line.
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

/// The decision. Detection only peeks: every byte is still queued on both sockets for
/// whoever forwards them (hyper, splice or the kernel), so no forwarder needs a replay.
pub struct Classified {
    pub protocol: Protocol,
    pub elapsed: Duration,
}

/// Peeks at the client until its protocol is known, the server speaks, or `timeout` passes.
/// `server` is None when there is no upstream (its connect failed): then only the client counts.
pub async fn classify(
    client: &TcpStream,
    server: Option<&TcpStream>,
    timeout: Duration,
) -> Classified {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    // Allocated on the first peek: a silent connection holds no buffer.
    let mut peeked = Peeked::default();
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
                match peeked.peek_more(client) {
                    Ok(PeekOutcome::NothingNew) => continue,
                    Ok(PeekOutcome::Eof) => break decided(detect::undecided(peeked.bytes())),
                    Err(_) => break Protocol::Opaque(OpaqueReason::Error),
                    Ok(PeekOutcome::More) => {}
                }
                match detect::detect(peeked.bytes()) {
                    Detection::NeedMore if peeked.len < MAX_DETECT_BYTES => continue,
                    Detection::NeedMore => break decided(detect::undecided(peeked.bytes())),
                    decision => break decided(decision),
                }
            }
            _ = tokio::time::sleep_until(deadline) => break match detect::undecided(peeked.bytes()) {
                Detection::Tls { sni } => Protocol::Tls { sni },
                _ => Protocol::Opaque(OpaqueReason::Timeout),
            },
        }
    };
    // Waiting for more bytes raised the client's low-water mark; whoever reads next expects
    // the default. (Most clients send their first message whole: no mark was raised, and
    // this is one system call per connection saved.)
    if peeked.raised_low_water {
        let _ = set_rcvlowat(client, 1);
    }
    Classified {
        protocol,
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

enum PeekOutcome {
    /// More bytes than last time.
    More,
    /// Nothing new yet; readiness now waits for more than what was seen.
    NothingNew,
    /// The client closed its side; `bytes()` is all it will ever send.
    Eof,
}

/// The client's first bytes, as last peeked.
#[derive(Default)]
struct Peeked {
    buf: Vec<u8>,
    len: usize,
    /// Whether the client's low-water mark was raised above the default.
    raised_low_water: bool,
}

impl Peeked {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Peeks at everything queued (up to MAX_DETECT_BYTES). A peek never drains the socket, so
    /// "nothing new" must make readiness wait for more: the low-water mark goes just above
    /// what was seen, and the readiness that woke us is cleared inside the same `try_io`, so a
    /// byte arriving meanwhile still wakes us.
    fn peek_more(&mut self, client: &TcpStream) -> io::Result<PeekOutcome> {
        let outcome = client.try_io(Interest::READABLE, || {
            loop {
                let want = (self.len + INITIAL_BUFFER).min(MAX_DETECT_BYTES);
                if self.buf.len() < want {
                    self.buf.resize(want, 0);
                }
                let seen = peek(client, &mut self.buf)?;
                if seen > self.len {
                    self.len = seen;
                    // A full buffer may hide more: look again with a larger one.
                    if seen == self.buf.len() && seen < MAX_DETECT_BYTES {
                        continue;
                    }
                    return Ok(PeekOutcome::More);
                }
                let closed = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
                if sys::poll_now(client, libc::POLLRDHUP) & closed != 0 {
                    return Ok(PeekOutcome::Eof);
                }
                let low_water = libc::c_int::try_from(self.len + 1).unwrap_or(libc::c_int::MAX);
                self.raised_low_water = true;
                set_rcvlowat(client, low_water)?;
                // Recheck: a byte may have arrived before the mark went up.
                if peek(client, &mut self.buf)? > self.len {
                    continue;
                }
                return Err(io::ErrorKind::WouldBlock.into());
            }
        });
        match outcome {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(PeekOutcome::NothingNew),
            other => other,
        }
    }
}

/// One non-blocking recv(MSG_PEEK).
fn peek(client: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    sys::peek(client, buf)
}

/// The detection timeout on paused time: tokio's clock jumps to the next timer whenever the
/// runtime is idle (real loopback I/O included), so the timeout costs no real time and the
/// elapsed time is exact.
#[cfg(test)]
mod paused_time_tests {
    use std::time::Duration;

    use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};

    use super::{OpaqueReason, Protocol, classify};
    use crate::forward::http::test_support::loopback_pair;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The proxy's two sockets and their peers: (application client, proxy's client side,
    /// proxy's server side, original destination).
    async fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let (app_client, proxy_client) = loopback_pair().await;
        let (proxy_server, app_server) = loopback_pair().await;
        (app_client, proxy_client, proxy_server, app_server)
    }

    /// Classifies, returning the result and how much of tokio's clock passed.
    async fn timed(client: &TcpStream, server: &TcpStream) -> (Protocol, Duration) {
        let started = Instant::now();
        let classified = classify(client, Some(server), TIMEOUT).await;
        (classified.protocol, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_and_server_time_out_after_exactly_the_timeout() {
        let (_app_client, client, server, _app_server) = sockets().await;
        let (protocol, elapsed) = timed(&client, &server).await;
        assert_eq!(protocol, Protocol::Opaque(OpaqueReason::Timeout));
        assert_eq!(elapsed, TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_undecided_client_times_out_too() {
        let (mut app_client, client, server, _app_server) = sockets().await;
        // The start of a request line, never finished.
        app_client.write_all(b"GE").await.unwrap();
        let (protocol, elapsed) = timed(&client, &server).await;
        assert_eq!(protocol, Protocol::Opaque(OpaqueReason::Timeout));
        assert_eq!(elapsed, TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_speaks_first_is_server_first_without_waiting() {
        let (_app_client, client, server, mut app_server) = sockets().await;
        app_server
            .write_all(b"220 smtp.test ESMTP\r\n")
            .await
            .unwrap();
        let (protocol, elapsed) = timed(&client, &server).await;
        assert_eq!(protocol, Protocol::Opaque(OpaqueReason::ServerFirst));
        assert_eq!(elapsed, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2c_servers_settings_is_not_server_first() {
        let (_app_client, client, server, mut app_server) = sockets().await;
        // An empty SETTINGS frame: what an h2c server sends without waiting for the client.
        app_server
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let (protocol, elapsed) = timed(&client, &server).await;
        assert_eq!(protocol, Protocol::Opaque(OpaqueReason::Timeout));
        assert_eq!(elapsed, TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_request_line_decides_without_waiting() {
        let (mut app_client, client, server, _app_server) = sockets().await;
        app_client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (protocol, elapsed) = timed(&client, &server).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(elapsed, Duration::ZERO);
    }
}
