//! The end-of-stream side of in-kernel forwarding. While the kernel moves a connection's bytes,
//! the agent only watches its edges: one epoll instance for every forwarded socket, registered
//! for end of stream and errors only (`Watcher`), and per connection a supervisor that passes
//! each half-close on once every byte before it has reached the other socket, and resets both
//! sockets on an error (`supervise`).

use std::{
    collections::HashMap,
    io,
    net::{self, Shutdown},
    os::fd::{AsFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{io::unix::AsyncFd, sync::Notify};

use super::{CLIENT, Pair, SERVER};
use crate::{
    forward::opaque::{Failure, Outcome},
    sys::{self, poll_now, tcp_info},
};

/// Most events taken from the watcher's epoll per wake-up.
const EVENTS_PER_WAKE: usize = 256;
/// Waiting for bytes to reach the other socket before passing a half-close on: polled, from
/// this interval doubling up to the next (a half-close is once per direction per connection).
const DRAIN_POLL_FIRST: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(50);
/// If bytes are owed to a socket but nothing moves and nothing is queued in TCP for this long,
/// the kernel has lost them (it can only drop bytes when a socket is being torn down): reset
/// rather than wait forever.
const DRAIN_STALL_LIMIT: Duration = Duration::from_secs(5);

/// One direction of the connection, named for error messages.
struct Leg<'a> {
    /// CLIENT or SERVER: the side the bytes come from.
    side: usize,
    from: &'a net::TcpStream,
    to: &'a net::TcpStream,
    from_name: &'static str,
    to_name: &'static str,
    /// The step named when shutting `to` down fails.
    shutting_down: &'static str,
    open: bool,
}

/// Waits for each side's end of stream and passes it on; stops at the first error.
pub(super) async fn supervise(pair: &Pair, watch: &Watch<'_>) -> Outcome {
    let mut upload = Leg {
        side: CLIENT,
        from: &pair.client,
        to: &pair.server,
        from_name: "client",
        to_name: "server",
        shutting_down: "shutting down server",
        open: true,
    };
    let mut download = Leg {
        side: SERVER,
        from: &pair.server,
        to: &pair.client,
        from_name: "server",
        to_name: "client",
        shutting_down: "shutting down client",
        open: true,
    };
    loop {
        if let Err(failure) = check_errors(pair) {
            return Outcome::Reset(failure);
        }
        for leg in [&mut upload, &mut download] {
            if leg.open
                && poll_now(leg.from, libc::POLLRDHUP) & (libc::POLLRDHUP | libc::POLLHUP) != 0
            {
                pair.fin_seen[leg.side].store(true, Ordering::Relaxed);
                if let Err(failure) = pass_on_close(pair, leg).await {
                    return Outcome::Reset(failure);
                }
                leg.open = false;
            }
        }
        if !upload.open && !download.open {
            return Outcome::Closed;
        }
        watch.changed().await;
    }
}

/// Any pending socket error (a reset from the peer, a send the kernel could not complete).
fn check_errors(pair: &Pair) -> Result<(), Failure> {
    for (socket, step) in [
        (&pair.client, "client socket"),
        (&pair.server, "server socket"),
    ] {
        match socket.take_error() {
            Ok(None) => {}
            Ok(Some(error)) | Err(error) => return Err(Failure { step, error }),
        }
    }
    Ok(())
}

/// `leg.from` reached end of stream: once everything it received has reached `leg.to`'s send
/// queue, shut `leg.to` for writing.
async fn pass_on_close(pair: &Pair, leg: &Leg<'_>) -> Result<(), Failure> {
    let mut interval = DRAIN_POLL_FIRST;
    let mut stalled = Duration::ZERO;
    let mut last_queued = None;
    loop {
        // Its FIN counts as one received byte; it is not forwarded, the shutdown below is.
        let received = tcp_info(leg.from)
            .map_err(|error| Failure {
                step: leg.from_name,
                error,
            })?
            .tcpi_bytes_received
            .saturating_sub(1);
        let to_info = tcp_info(leg.to).map_err(|error| Failure {
            step: leg.to_name,
            error,
        })?;
        let queued = bytes_queued(&to_info);
        if queued >= received {
            tracing::debug!(
                from = leg.from_name,
                received,
                queued,
                sent = to_info.tcpi_bytes_sent,
                retrans = to_info.tcpi_bytes_retrans,
                notsent = to_info.tcpi_notsent_bytes,
                "end of stream passed on"
            );
            break;
        }
        // Still on its way through the kernel, or waiting for room in the send buffer.
        check_errors(pair)?;
        let in_flight = to_info.tcpi_notsent_bytes > 0 || to_info.tcpi_unacked > 0;
        if last_queued == Some(queued) && !in_flight {
            stalled += interval;
            if stalled >= DRAIN_STALL_LIMIT {
                tracing::warn!(
                    from = leg.from_name,
                    owed = received - queued,
                    "bytes forwarded in the kernel never reached the other socket"
                );
                return Err(Failure {
                    step: "forwarding in the kernel",
                    error: io::Error::from(io::ErrorKind::BrokenPipe),
                });
            }
        } else {
            stalled = Duration::ZERO;
        }
        last_queued = Some(queued);
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(DRAIN_POLL_MAX);
    }
    leg.to.shutdown(Shutdown::Write).map_err(|error| Failure {
        step: leg.shutting_down,
        error,
    })
}

/// Every payload byte ever written into the socket's send queue, by anyone: the bytes sent
/// (once; retransmissions subtracted) plus the bytes not sent yet. One TCP_INFO read is one
/// consistent snapshot.
fn bytes_queued(info: &libc::tcp_info) -> u64 {
    info.tcpi_bytes_sent
        .saturating_sub(info.tcpi_bytes_retrans)
        .saturating_add(u64::from(info.tcpi_notsent_bytes))
}

/// One epoll instance for every kernel-forwarded socket, registered for end of stream and
/// errors only (EPOLLRDHUP; EPOLLERR and EPOLLHUP are implied). The kernel wakes socket
/// waiters with EPOLLIN on every forwarded message; epoll filters those out here, so a busy
/// connection costs the agent nothing until it closes.
pub(super) struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
    next_token: AtomicU64,
}

impl Watcher {
    pub(super) fn new() -> io::Result<Self> {
        // The AsyncFd owns the descriptor, so it stays open for as long as it is registered.
        let epoll = sys::epoll_create()?;
        Ok(Self {
            epoll,
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
        })
    }

    /// Wakes the connection behind each event, for as long as the agent runs.
    pub(super) async fn dispatch(self: Arc<Self>) {
        let mut events: Vec<sys::EpollEvent> =
            vec![sys::EpollEvent { events: 0, u64: 0 }; EVENTS_PER_WAKE];
        loop {
            let Ok(mut guard) = self.epoll.readable().await else {
                tracing::error!("the kernel-forwarding watcher failed; half-closes stall");
                return;
            };
            let count = sys::epoll_wait_now(self.epoll.get_ref().as_fd(), &mut events);
            if count < EVENTS_PER_WAKE {
                guard.clear_ready();
            }
            let waiters = self.waiters.lock();
            for event in &events[..count] {
                let token = event.u64;
                if let Some(waiter) = waiters.get(&token) {
                    waiter.notify_one();
                }
            }
        }
    }

    pub(super) fn watch(&self, fds: [RawFd; 2]) -> io::Result<Watch<'_>> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.waiters.lock().insert(token, Arc::clone(&notify));
        let mut watch = Watch {
            watcher: self,
            token,
            fds,
            registered: 0,
            notify,
        };
        let events = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        for fd in watch.fds {
            sys::epoll_add(self.epoll.get_ref().as_fd(), fd, events, token)?;
            watch.registered += 1;
        }
        Ok(watch)
    }
}

/// One connection's registration with the watcher; dropping it unregisters, so it must be
/// dropped while the sockets are still open.
pub(super) struct Watch<'a> {
    watcher: &'a Watcher,
    token: u64,
    fds: [RawFd; 2],
    registered: usize,
    notify: Arc<Notify>,
}

impl Watch<'_> {
    /// Resolves after the next end-of-stream or error event on either socket (or at once if
    /// one came since the last call).
    async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let epoll = self.watcher.epoll.get_ref().as_fd();
        // The descriptors are still open here: the pair outlives its watch.
        for fd in &self.fds[..self.registered] {
            sys::epoll_remove(epoll, *fd);
        }
        self.watcher.waiters.lock().remove(&self.token);
    }
}
