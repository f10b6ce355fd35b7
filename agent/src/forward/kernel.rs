//! In-kernel forwarding (`--copy-mode sockmap`, the default): once a spliced opaque connection
//! turns out chatty (`opaque::ChattyGate`), its two proxy sockets are handed to the
//! `sockmesh_fwd` stream-verdict program, which moves every byte either socket receives to the
//! other's send queue inside the kernel. The agent then neither reads nor writes: it is not
//! woken per message, which is what a proxy on a request/response workload spends its time on.
//!
//! What stays in user space is the connection's edges: it watches both sockets for end of
//! stream and errors only (one epoll instance for all connections, registered for
//! EPOLLRDHUP, which data arrival never triggers), passes a half-close on once every byte
//! before it has reached the other socket's send queue, resets both sockets on an error, and
//! reads byte counts from TCP_INFO (at /metrics scrapes and at the end).
//!
//! Order is safe by construction: the kernel forwards whole socket buffers, so a partly read
//! one would repeat bytes; detection only peeks and splice hands over only after emptying both
//! receive queues, so none is partly read. Everything spliced has reached the other socket's
//! send queue before the hand-off (no pipe holds bytes). The sockets join `FWD_PEERS` before
//! `FWD_ACTIVE` (a forwarded byte always finds its peer), and bytes that arrived before the
//! hand-off are pushed through the verdict by a SO_RCVLOWAT write, which makes the kernel
//! process the receive queue in order.

use std::{
    collections::HashMap,
    io,
    net::{self, Shutdown},
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, SockHash};
use parking_lot::{Mutex, MutexGuard};
use tokio::{io::unix::AsyncFd, net::TcpStream, sync::Notify};

use super::{
    ByteCounters,
    opaque::{Failure, Outcome},
};
use crate::sys::{self, poll_now, set_rcvlowat, tcp_info};

/// TCP states (include/net/tcp_states.h) as TCP_INFO reports them.
const TCP_ESTABLISHED: u32 = 1;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

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

/// The kernel side of forwarding: the two socket maps and the end-of-stream watcher.
pub struct KernelForwarder {
    peers: Mutex<SockHash<MapData, u64>>,
    active: Mutex<SockHash<MapData, u64>>,
    watcher: Arc<Watcher>,
    live: LiveConnections,
}

/// What became of a connection offered to the kernel.
pub enum Handoff {
    /// The kernel forwarded it; this is how it ended.
    Forwarded(Outcome),
    /// The kernel did not take it (socket maps full, a socket already closing): nothing was
    /// forwarded, the sockets are back, forward them another way.
    Declined(TcpStream, TcpStream),
}

impl KernelForwarder {
    /// Starts the end-of-stream watcher; must be called inside the tokio runtime.
    pub fn new(peers: SockHash<MapData, u64>, active: SockHash<MapData, u64>) -> io::Result<Self> {
        let watcher = Arc::new(Watcher::new()?);
        tokio::spawn(Arc::clone(&watcher).dispatch());
        Ok(Self {
            peers: Mutex::new(peers),
            active: Mutex::new(active),
            watcher,
            live: LiveConnections::default(),
        })
    }

    /// Brings the byte counters of every connection the kernel is forwarding up to date (they
    /// are otherwise updated when a connection ends). Called before /metrics is rendered.
    pub fn sync_counters(&self) {
        self.live.sync_all();
    }

    /// Forwards `client` <-> `server` in the kernel until both directions are done or one
    /// fails. Neither receive queue may hold a partly read socket buffer (the kernel forwards
    /// whole buffers, including bytes a reader already took), and every byte read so far must
    /// already be written to the other socket.
    /// `on_forwarding` runs once the kernel has taken the connection.
    pub async fn forward(
        &self,
        client: TcpStream,
        server: TcpStream,
        counters: &ByteCounters,
        on_forwarding: impl FnOnce(),
    ) -> Handoff {
        // Out of tokio's reactor: its registration would wake the runtime on every message.
        let (client, server) = match (client.into_std(), server.into_std()) {
            (Ok(client), Ok(server)) => (client, server),
            (Err(error), _) | (_, Err(error)) => {
                return Handoff::Forwarded(Outcome::Reset(Failure {
                    step: "leaving the reactor",
                    error,
                }));
            }
        };
        let pair = Pair {
            client,
            server,
            counters: counters.clone(),
            // Bytes spliced before the hand-off are counted already, and TCP_INFO's totals
            // include them.
            reported: Mutex::new([counters.total_to_server(), counters.total_from_server()]),
            fin_seen: [AtomicBool::new(false), AtomicBool::new(false)],
        };
        let cookie = |socket: &net::TcpStream| socket2::SockRef::from(socket).cookie();
        let cookies = match (cookie(&pair.client), cookie(&pair.server)) {
            (Ok(client), Ok(server)) => [client, server],
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(%error, "no socket cookie; not forwarding in the kernel");
                return decline(pair);
            }
        };
        if let Err(error) = self.join_peers(&pair, cookies) {
            tracing::debug!(%error, "FWD_PEERS refused the sockets; not forwarding in the kernel");
            self.leave(cookies);
            return decline(pair);
        }
        // Watched before activation, so no end of stream can go unnoticed.
        let watch = match self.watcher.watch(pair.fds()) {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(%error, "cannot watch the sockets; not forwarding in the kernel");
                self.leave(cookies);
                return decline(pair);
            }
        };
        match self.activate(&pair, cookies) {
            Activation::Done => {}
            Activation::NoneActive(error) => {
                tracing::debug!(%error, "FWD_ACTIVE refused the sockets; not forwarding in the kernel");
                drop(watch);
                self.leave(cookies);
                return decline(pair);
            }
            Activation::Partial(error) => {
                // Bytes may already be on their way through the kernel: no other way of
                // forwarding can take over without reordering them.
                drop(watch);
                reset_both(&pair);
                return Handoff::Forwarded(Outcome::Reset(Failure {
                    step: "handing the sockets to the kernel",
                    error,
                }));
            }
        }
        on_forwarding();
        let pair = Arc::new(pair);
        let registered = self.live.register(&pair);
        let outcome = supervise(&pair, &watch).await;
        drop(registered);
        drop(watch);
        pair.sync_counters(Sync::Final);
        if matches!(outcome, Outcome::Reset(_)) {
            reset_both(&pair);
        }
        // Closing the sockets takes them out of both maps.
        Handoff::Forwarded(outcome)
    }

    fn join_peers(
        &self,
        pair: &Pair,
        [client, server]: [u64; 2],
    ) -> Result<(), aya::maps::MapError> {
        let mut peers = self.peers.lock();
        // Under each socket's cookie, the socket its bytes go out of.
        peers.insert(client, pair.server.as_raw_fd(), 0)?;
        peers.insert(server, pair.client.as_raw_fd(), 0)
    }

    fn activate(&self, pair: &Pair, [client, server]: [u64; 2]) -> Activation {
        // The kernel takes only established sockets. A FIN that arrives between the two
        // inserts below would leave one socket active and the other not, which only a reset
        // can end; checking first leaves that to the few microseconds between the inserts.
        for socket in [&pair.client, &pair.server] {
            match tcp_info(socket) {
                Ok(info) if u32::from(info.tcpi_state) == TCP_ESTABLISHED => {}
                Ok(_) => return Activation::NoneActive(io::Error::other("a socket is closing")),
                Err(error) => return Activation::NoneActive(error),
            }
        }
        let mut active = self.active.lock();
        if let Err(error) = active.insert(client, pair.client.as_raw_fd(), 0) {
            return Activation::NoneActive(io::Error::other(error));
        }
        if let Err(error) = active.insert(server, pair.server.as_raw_fd(), 0) {
            return Activation::Partial(io::Error::other(error));
        }
        drop(active);
        // Bytes that arrived before the verdict was attached wait in the receive queues; a
        // SO_RCVLOWAT write makes TCP signal "data ready", which runs them through the
        // verdict in order (bytes arriving meanwhile join the same queue behind them).
        for socket in [&pair.client, &pair.server] {
            if let Err(error) = set_rcvlowat(socket, 1) {
                return Activation::Partial(error);
            }
        }
        Activation::Done
    }

    /// Takes the sockets out of both maps (entries that are not there are ignored).
    fn leave(&self, cookies: [u64; 2]) {
        for map in [&self.active, &self.peers] {
            let mut map = map.lock();
            for cookie in &cookies {
                let _ = map.remove(cookie);
            }
        }
    }
}

enum Activation {
    Done,
    /// Nothing is forwarded by the kernel yet: safe to forward another way.
    NoneActive(io::Error),
    /// The client socket is active, the server's is not.
    Partial(io::Error),
}

/// The connection's two proxy sockets while the kernel forwards between them.
struct Pair {
    client: net::TcpStream,
    server: net::TcpStream,
    counters: ByteCounters,
    /// Bytes already added to the counters: client to server, server to client.
    reported: Mutex<[u64; 2]>,
    /// Whether the client / the server has sent its FIN (seen by `supervise`).
    fin_seen: [AtomicBool; 2],
}

/// When counters are brought up to date.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// While the kernel forwards (a /metrics scrape).
    Live,
    /// After forwarding ended.
    Final,
}

const CLIENT: usize = 0;
const SERVER: usize = 1;

impl Pair {
    fn fds(&self) -> [RawFd; 2] {
        [self.client.as_raw_fd(), self.server.as_raw_fd()]
    }

    /// Adds what each socket received since the last call to the byte counters. Every byte
    /// a proxy socket receives is forwarded.
    fn sync_counters(&self, when: Sync) {
        let received = [
            self.data_received(&self.client, CLIENT, when),
            self.data_received(&self.server, SERVER, when),
        ];
        let mut reported = self.reported.lock();
        if let Some(total) = received[CLIENT] {
            let new = total.saturating_sub(reported[CLIENT]);
            self.counters.client_to_server(new);
            reported[CLIENT] += new;
        }
        if let Some(total) = received[SERVER] {
            let new = total.saturating_sub(reported[SERVER]);
            self.counters.server_to_client(new);
            reported[SERVER] += new;
        }
    }

    /// Payload bytes `socket` has received. TCP counts a FIN as one byte of sequence space;
    /// it is subtracted wherever the state shows a FIN arrived. A closed socket cannot tell a
    /// FIN from a reset, so while forwarding it is skipped (the final count settles it).
    fn data_received(&self, socket: &net::TcpStream, side: usize, when: Sync) -> Option<u64> {
        let info = tcp_info(socket).ok()?;
        let fin = match u32::from(info.tcpi_state) {
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT => true,
            TCP_CLOSE if when == Sync::Final => self.fin_seen[side].load(Ordering::Relaxed),
            TCP_CLOSE => return None,
            _ => false,
        };
        Some(info.tcpi_bytes_received.saturating_sub(u64::from(fin)))
    }
}

fn decline(pair: Pair) -> Handoff {
    match (
        TcpStream::from_std(pair.client),
        TcpStream::from_std(pair.server),
    ) {
        (Ok(client), Ok(server)) => Handoff::Declined(client, server),
        (Err(error), _) | (_, Err(error)) => Handoff::Forwarded(Outcome::Reset(Failure {
            step: "returning to the reactor",
            error,
        })),
    }
}

fn reset_both(pair: &Pair) {
    for socket in [&pair.client, &pair.server] {
        let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
    }
}

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
async fn supervise(pair: &Pair, watch: &Watch<'_>) -> Outcome {
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

/// The connections the kernel is forwarding now, for counter updates at scrape time.
#[derive(Default)]
struct LiveConnections {
    pairs: Mutex<HashMap<usize, Weak<Pair>>>,
}

impl LiveConnections {
    fn register(&self, pair: &Arc<Pair>) -> Registered<'_> {
        let key = Arc::as_ptr(pair) as usize;
        self.lock().insert(key, Arc::downgrade(pair));
        Registered { live: self, key }
    }

    fn sync_all(&self) {
        let pairs: Vec<Arc<Pair>> = self.lock().values().filter_map(Weak::upgrade).collect();
        for pair in pairs {
            pair.sync_counters(Sync::Live);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Weak<Pair>>> {
        self.pairs.lock()
    }
}

/// Removes a connection from the live set when its forwarding ends.
struct Registered<'a> {
    live: &'a LiveConnections,
    key: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.live.lock().remove(&self.key);
    }
}

/// One epoll instance for every kernel-forwarded socket, registered for end of stream and
/// errors only (EPOLLRDHUP; EPOLLERR and EPOLLHUP are implied). The kernel wakes socket
/// waiters with EPOLLIN on every forwarded message; epoll filters those out here, so a busy
/// connection costs the agent nothing until it closes.
struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
    next_token: AtomicU64,
}

impl Watcher {
    fn new() -> io::Result<Self> {
        // The AsyncFd owns the descriptor, so it stays open for as long as it is registered.
        let epoll = sys::epoll_create()?;
        Ok(Self {
            epoll,
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
        })
    }

    /// Wakes the connection behind each event, for as long as the agent runs.
    async fn dispatch(self: Arc<Self>) {
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

    fn watch(&self, fds: [RawFd; 2]) -> io::Result<Watch<'_>> {
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
struct Watch<'a> {
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
