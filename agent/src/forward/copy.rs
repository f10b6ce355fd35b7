//! Forwarding through user space (read, then write): chatty opaque connections the kernel does
//! not take, `--copy-mode userspace`, h2c frames passed through (`copy_observed`), and
//! connections paired with the application's socket (`copy_accelerated`). The buffer is the proxy thread's, lent for
//! one read and its write: a connection holds no buffer of its own unless a write would block,
//! and then only the bytes still to write. (tokio's copy_bidirectional keeps 2 x 8 KiB per
//! connection for its whole life: 1,000 busy chatty connections cost 20.6 KiB each with it.)
//! Each direction ends on its own (EOF becomes shutdown(SHUT_WR) on the other socket); an
//! error on either resets both.

use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    pin::Pin,
    task::{Context, Poll, ready},
};

use socket2::SockRef;
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::{TcpStream, tcp::ReadHalf},
};
use tokio_util::sync::CancellationToken;

use crate::accel::AccelLink;

use super::{
    ByteCounters,
    opaque::{Failure, Outcome, reset},
};

/// The most one read takes.
const CHUNK: usize = 64 * 1024;

thread_local! {
    /// Lent to one read and its write at a time (never across an await). The proxy runs one
    /// single-threaded runtime per core, so each thread has exactly one.
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

/// Forwards `client` <-> `server` until both directions are done or one fails.
pub async fn copy_bidirectional(
    client: TcpStream,
    server: TcpStream,
    counters: &ByteCounters,
) -> Outcome {
    copy_observed(client, server, counters, |_| {}, |_| {}, None, &|_| {}).await
}

/// `--accelerate local`: `copy_bidirectional` for a connection paired with the application's
/// socket, telling `link` what was read from and written to the client, and reading from the
/// server only while the application has room (the kernel does not bound its queue).
pub async fn copy_accelerated(
    client: TcpStream,
    server: TcpStream,
    counters: &ByteCounters,
    link: &AccelLink,
) -> Outcome {
    let hooks = ClientHooks {
        wrote: &|bytes| link.wrote(bytes),
        has_room: &|| link.app_has_room(),
    };
    let observers = Observers {
        from_client: |bytes: &[u8]| link.read(bytes.len()),
        from_server: |_: &[u8]| {},
        ended: &|_| {},
    };
    copy_with(client, server, counters, observers, None, hooks).await
}

/// What the copy tells about its writes to the client, and asks before reading what it would
/// write to it (`--accelerate local`).
#[derive(Clone, Copy)]
struct ClientHooks<'a> {
    /// Bytes written to the client.
    wrote: &'a (dyn Fn(u64) + Sync),
    /// Whether the client may be given more now.
    has_room: &'a (dyn Fn() -> bool + Sync),
}

impl ClientHooks<'_> {
    const NONE: ClientHooks<'static> = ClientHooks {
        wrote: &|_| {},
        has_room: &|| true,
    };
}

/// Bytes the proxy puts into the server-to-client direction once, when `when` is cancelled
/// and then as soon as `may_go` says the stream is between two messages (HTTP/2: a GOAWAY at
/// shutdown, between two frames). `may_go` is asked only when every byte read has been
/// written, and may say "never" (`None`).
pub struct Interjection<'a> {
    pub when: &'a CancellationToken,
    pub may_go: &'a (dyn Fn() -> Option<bool> + Sync),
    pub bytes: &'a [u8],
}

/// One side of a copied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Client,
    Server,
}

/// `copy_bidirectional`, showing each chunk to `from_client` or `from_server` as it is read,
/// before it is written on: an observer of the bytes (HTTP/2's frames) that changes none,
/// and puts in only `to_client`'s bytes, if any. `ended` hears of each side's end as it
/// happens: its end of stream, or a failure reading from or writing to it (an observer of a
/// protocol needs to know who gave up on what was in flight); a side may be named twice.
pub async fn copy_observed(
    client: TcpStream,
    server: TcpStream,
    counters: &ByteCounters,
    from_client: impl FnMut(&[u8]),
    from_server: impl FnMut(&[u8]),
    to_client: Option<Interjection<'_>>,
    ended: &(dyn Fn(Peer) + Sync),
) -> Outcome {
    let observers = Observers {
        from_client,
        from_server,
        ended,
    };
    copy_with(
        client,
        server,
        counters,
        observers,
        to_client,
        ClientHooks::NONE,
    )
    .await
}

/// What watches a copy: each direction's bytes as they are read, and each side's end.
struct Observers<'a, C, S> {
    from_client: C,
    from_server: S,
    ended: &'a (dyn Fn(Peer) + Sync),
}

async fn copy_with(
    mut client: TcpStream,
    mut server: TcpStream,
    counters: &ByteCounters,
    observers: Observers<'_, impl FnMut(&[u8]), impl FnMut(&[u8])>,
    to_client: Option<Interjection<'_>>,
    hooks: ClientHooks<'_>,
) -> Outcome {
    let Observers {
        from_client,
        from_server,
        ended,
    } = observers;
    let result = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let to_server = copy_one_way(
            client_read,
            server_write.as_ref(),
            from_client,
            None,
            |bytes| counters.client_to_server(bytes),
            ClientHooks::NONE.has_room,
            Ends {
                source: Peer::Client,
                destination: Peer::Server,
                ended,
            },
        );
        let to_client = copy_one_way(
            server_read,
            client_write.as_ref(),
            from_server,
            to_client,
            |bytes| {
                counters.server_to_client(bytes);
                (hooks.wrote)(bytes);
            },
            hooks.has_room,
            Ends {
                source: Peer::Server,
                destination: Peer::Client,
                ended,
            },
        );
        tokio::try_join!(to_server, to_client)
    };
    match result {
        Ok(_) => Outcome::Closed,
        Err(error) => {
            reset(&client);
            reset(&server);
            Outcome::Reset(Failure {
                step: "copying",
                error,
            })
        }
    }
}

/// Which peers a direction reads from and writes to, and who hears when one ends.
struct Ends<'a> {
    source: Peer,
    destination: Peer,
    ended: &'a (dyn Fn(Peer) + Sync),
}

/// Which end of a direction an error came from.
enum Broke {
    Reading(io::Error),
    Writing(io::Error),
}

/// What one read and its write did.
enum Step {
    /// This many bytes were read and written.
    Moved(usize),
    /// End of stream from `from`.
    Eof,
    /// `to` took `written` bytes only: the rest, to write once it is writable.
    Blocked { written: usize, rest: Vec<u8> },
}

/// Moves `from`'s bytes to `to` until `from` ends (then half-closes `to`) or either fails,
/// telling `ends` which peer ended it. `observe` sees the bytes as they are read; `count`
/// hears of them once they are written.
async fn copy_one_way(
    from: ReadHalf<'_>,
    to: &TcpStream,
    observe: impl FnMut(&[u8]),
    interjection: Option<Interjection<'_>>,
    count: impl Fn(u64),
    has_room: &(dyn Fn() -> bool + Sync),
    ends: Ends<'_>,
) -> io::Result<()> {
    let result = pump(from, to, observe, interjection, count, has_room).await;
    let (ended, result) = match result {
        // The source's end of stream, passed on.
        Ok(()) => (ends.source, Ok(())),
        Err(Broke::Reading(error)) => (ends.source, Err(error)),
        Err(Broke::Writing(error)) => (ends.destination, Err(error)),
    };
    (ends.ended)(ended);
    result
}

/// `copy_one_way`'s loop: its errors say which end they came from.
async fn pump(
    mut from: ReadHalf<'_>,
    to: &TcpStream,
    mut observe: impl FnMut(&[u8]),
    mut interjection: Option<Interjection<'_>>,
    count: impl Fn(u64),
    has_room: &(dyn Fn() -> bool + Sync),
) -> Result<(), Broke> {
    let mut armed = false;
    let mut no_room_for = NO_ROOM_FIRST_WAIT;
    loop {
        if !has_room() {
            // Nothing wakes us when the application reads (redirected bytes leave its socket
            // writable): look again after a while, less often the longer it does not read.
            // Boxed: only `--accelerate local` gets here, and a timer inline would add its
            // size (twice: one per direction) to every copied connection.
            Box::pin(tokio::time::sleep(no_room_for)).await;
            no_room_for = (no_room_for * 2).min(NO_ROOM_LAST_WAIT);
            continue;
        }
        no_room_for = NO_ROOM_FIRST_WAIT;
        if armed && let Some(pending) = &interjection {
            match (pending.may_go)() {
                Some(true) => {
                    write_all(to, pending.bytes).await.map_err(Broke::Writing)?;
                    interjection = None;
                }
                Some(false) => {}
                None => interjection = None,
            }
        }
        // One poll both reads and writes: it completes at once or reads nothing, so dropping
        // it for the interjection loses no byte. Polling keeps one waker slot per direction
        // (readable() would queue a waiter under the socket's lock at every message).
        let moved = std::future::poll_fn(|cx| {
            BUFFER.with_borrow_mut(|buffer| read_and_write(&mut from, cx, to, buffer, &mut observe))
        });
        let step = match &interjection {
            Some(pending) if !armed => tokio::select! {
                step = moved => step?,
                () = pending.when.cancelled() => {
                    armed = true;
                    continue;
                }
            },
            _ => moved.await?,
        };
        match step {
            Step::Moved(bytes) => count(bytes as u64),
            Step::Eof => return shutdown_write(to).map_err(Broke::Writing),
            Step::Blocked { written, rest } => {
                count(written as u64);
                write_all(to, &rest).await.map_err(Broke::Writing)?;
                count(rest.len() as u64);
            }
        }
    }
}

/// One non-blocking read into `buffer` and one non-blocking write of what it got.
///
/// tokio's poll_read, not try_read: a read that does not fill the buffer tells tokio the
/// socket is drained (epoll is edge-triggered; new bytes bring a new event), which saves the
/// read that would only find EAGAIN after every message.
fn read_and_write(
    from: &mut ReadHalf<'_>,
    cx: &mut Context<'_>,
    to: &TcpStream,
    buffer: &mut [u8],
    observe: &mut impl FnMut(&[u8]),
) -> Poll<Result<Step, Broke>> {
    let mut filled = ReadBuf::new(buffer);
    ready!(Pin::new(from).poll_read(cx, &mut filled)).map_err(Broke::Reading)?;
    let read = filled.filled().len();
    if read == 0 {
        return Poll::Ready(Ok(Step::Eof));
    }
    observe(&buffer[..read]);
    let written = match to.try_write(&buffer[..read]) {
        Ok(written) => written,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
        Err(error) => return Poll::Ready(Err(Broke::Writing(error))),
    };
    Poll::Ready(Ok(if written == read {
        Step::Moved(read)
    } else {
        Step::Blocked {
            written,
            rest: buffer[written..read].to_vec(),
        }
    }))
}

/// Writes all of `bytes`, waiting for `to` to drain as often as needed.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
        match to.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// `--accelerate local`: how soon to look again whether the application has read, at first
/// and at most.
const NO_ROOM_FIRST_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
const NO_ROOM_LAST_WAIT: std::time::Duration = std::time::Duration::from_millis(16);

/// Passes an end of stream on. A peer that is already gone is not an error here: its own
/// direction reports that.
fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Err(error) if error.kind() != io::ErrorKind::NotConnected => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::metrics::{Direction, Metrics, TcpLabels};

    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Byte counters of a metrics registry of their own.
    fn counters() -> ByteCounters {
        let metrics = Metrics::new(Box::new(|| Ok(Default::default())));
        let labels = TcpLabels {
            direction: Direction::Outbound,
            target_port: 1,
            workload: Default::default(),
        };
        ByteCounters::new(&metrics, &labels)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Tiny socket buffers on the way to the server, so nearly every write would block and the
    /// rest waits in the connection's own bytes: both directions arrive byte-exact and in
    /// order, each half-close is passed on, and the counters saw every byte.
    #[tokio::test]
    async fn blocked_writes_keep_order_and_half_closes_pass_on() {
        let (mut app_client, agent_client) = loopback_pair().await;
        let (agent_server, mut app_server) = loopback_pair().await;
        SockRef::from(&agent_server)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        SockRef::from(&app_server)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        let counters = counters();
        let (up, down) = (pattern(300_000, 1), pattern(100_000, 2));

        let forwarding = copy_bidirectional(agent_client, agent_server, &counters);
        let client = async {
            app_client.write_all(&up).await.unwrap();
            app_client.shutdown().await.unwrap();
            let mut got = Vec::new();
            app_client.read_to_end(&mut got).await.unwrap();
            got
        };
        let server = async {
            let mut got = Vec::new();
            app_server.read_to_end(&mut got).await.unwrap();
            app_server.write_all(&down).await.unwrap();
            app_server.shutdown().await.unwrap();
            got
        };
        let (outcome, got_down, got_up) = tokio::join!(forwarding, client, server);
        assert!(matches!(outcome, Outcome::Closed), "{outcome:?}");
        assert!(got_up == up, "client to server: {} bytes", got_up.len());
        assert!(
            got_down == down,
            "server to client: {} bytes",
            got_down.len()
        );
        assert_eq!(counters.total_to_server(), up.len() as u64);
        assert_eq!(counters.total_from_server(), down.len() as u64);
    }

    /// A reset from one side resets the other, not a clean end.
    #[tokio::test]
    async fn a_reset_resets_the_other_side() {
        let (app_client, agent_client) = loopback_pair().await;
        let (agent_server, mut app_server) = loopback_pair().await;
        let counters = counters();
        reset(&app_client);
        drop(app_client);
        let outcome = copy_bidirectional(agent_client, agent_server, &counters).await;
        assert!(matches!(outcome, Outcome::Reset(_)), "{outcome:?}");
        let mut buf = [0u8; 1];
        let read = app_server.read(&mut buf).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset)
        );
    }
}
